#!/usr/bin/env bash
# The one prepared GPU check of sepico_fast (issues 11, 16): one command, no internet.
#
#   GPU_CHECK_COMMIT=<sha> bash scripts/gpu_check.sh    # GPU machine, call timeout 480 s; results in $OUT
#   bash scripts/gpu_check.sh --dry-run                 # the same script on a CPU (CI), ~2 minutes
#   bash scripts/gpu_check.sh --only build,bench_compile --deadline 200   # a second, shorter call
#
# Options: --out DIR (default $OUT, else a new temporary folder), --deadline SECONDS (default
# 440: all work ends by then, counted from the script's start; give it the call's time limit
# minus 40 s), --only STEP,..., --skip STEP,..., --dry-run.
# GPU_CHECK_COMMIT: the commit the tree is (for a copy of the tree without .git); it
# is written into every record (bench/record.py reads it too). Without it: git, else unknown.
#
# Writes into the output folder, at most 7 files, none in sub-folders:
#   summary.txt      PASS / FAIL / PARTIAL / SKIPPED per step, seconds taken, a one-line note
#   gpu_check.log    the full output of every step
#   env.json         device, driver, versions (torch, triton, pip, setuptools, ...), the toolkit check
#   step_probe.json  scripts/gpu_step_probe.py: rewritten after each variant
#   bench.json       every benchmark row this run recorded (bench, bench_compile, train_step);
#                    `python -m bench.merge_rows bench.json` appends them to bench/results/
#   train.json       the 60-iteration run: metrics, per-phase table, scalars (whatever exists)
#   ext_build.tar    the built extension: `tar -xf` it in a checkout on a fresh machine so that
#                    a later call reuses it instead of building again (~10 s instead of ~90 s)
# All of them are written by this shell, not by the time-limited step, so a step stopped at
# its limit still leaves what it measured.
#
# Steps in running order: the headline numbers first (the step probe, the kernel rows, the
# fast-vs-upstream train_step rows), then the tests. Estimates are for the H100/H200 machine
# (16 cores), from the work each step does: none of them has been timed on it yet. A step
# starts only when its estimate (partial steps: the least time worth starting) fits before
# the deadline, else it is SKIPPED and says so; its hard limit is twice the estimate + 30 s,
# at most what is left. docs/gpu_check.md has the same list with the clock times.
#   env              15 s  device, versions, `python -m sepico_fast._cuda_toolkit`
#   build            90 s  in the background: SEPICO_FAST_REQUIRE_EXT=1 python setup.py build_ext
#                          --inplace (MAX_JOBS 12: 4 cores stay with the kernel rows), pip
#                          install -e . as the fallback; 10 s when the built extension matches
#                          the sources (hash of csrc/, setup.py, toolkit lookup, torch)
#   bench            60 s  partial, while build runs (extension not loaded): contrast kernel rows
#                          at N = 51,200 (DistCL, ProtoCL, BankCL fwd+bwd, statistics update:
#                          Triton, torch, upstream formulation; GB/s and % of the copy bandwidth
#                          measured in the same run)
#   step_probe       60 s  partial: scripts/gpu_step_probe.py, DAFormer MiT-B5 640, 2+2, bf16
#                          DistCL, eager and with --cuda-graphs ("not available in this build"
#                          without that switch): ms/iter, GPU-busy ms vs wall, img/s, MFU, host
#                          syncs, peak memory
#   train_step       60 s  partial: MiT-B5 640 2+2 eager, bf16: the fast step vs the upstream
#                          dataflow (fp32) and vs upstream with TF32 + foreach AdamW
#   -- at ~225 s (~195 s with a reused build): the probe's eager and graphs rows, the kernel
#      rows and the bf16 train_step rows
#   probe_compiled   90 s  partial: the same probe with --compile (inductor compile included)
#   bench_ops        30 s  partial: pixel-op rows (upstream loops, torch, CUDA extension)
#   cmake_sanitizer  60 s  alongside: CMake build + ctest + compute-sanitizer memcheck and
#                          racecheck of csrc/tests
#   train60          60 s  alongside: python -m sepico_fast.train --amp, 60 iterations, --nvtx
#                          --profile (shares the GPU with the tests: its times are no measurement)
#   triton_tests     90 s  compiled Triton kernels vs float64 in fp32/bf16/fp16, the same inside
#                          torch.compile (one graph), CUDA host-sync and graph-timing checks
#   ext_tests        40 s  extension vs torch (tests/test_ops_cuda.py), resume on CUDA
#   no_host_sync     35 s  the CUDA cases of tests/test_no_host_sync.py (-k cuda; CI runs the rest)
#   probe_more       90 s  partial: the probe's other variants (fp16 + GradScaler, BankCL full bank,
#                          ProtoCL), added to step_probe.json
#   train_step_more  60 s  partial: the fp32 train_step rows (MiT-B5 640 2+2 eager)
#   bench_compile   150 s  partial: torch.compile of the reference at N = 51,200 (one inductor
#                          compile per row, 30-40 s each)
# With the default deadline (440 s) a first call gets the headline and some of the tests; the
# second call (<= 240 s, --deadline 200) runs the rest:
# `--only build,triton_tests,ext_tests,no_host_sync,cmake_sanitizer,train60` (build is reused
# when the machine is still warm or ext_build.tar was carried).
#
# --dry-run runs every step on the CPU (GPU work collected, or run at a tiny size, or one CPU
# row of each cheap bench file), so that CI (.ci/run) keeps the script from rotting.
# Exit status: 1 when a step FAILED (a PARTIAL or SKIPPED step is not a failure).
set -uo pipefail
START=$(date +%s)   # the caller's time limit counts from here

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
SELF="$ROOT/scripts/gpu_check.sh"

# Internal: `gpu_check.sh __step NAME` runs one step in a fresh process (started by run_step
# under `timeout`, which stops the step and everything it started at its limit). The state
# comes from the environment (GC_*), the step functions from this file.
if [ "${1:-}" = "__step" ]; then INTERNAL_STEP="$2"; else INTERNAL_STEP=""; fi

DRY=0
DEADLINE=440
OUT_DIR="${OUT:-}"
ONLY=""
SKIP=""
ALL_STEPS="env build bench step_probe train_step probe_compiled bench_ops cmake_sanitizer train60 triton_tests ext_tests no_host_sync probe_more train_step_more bench_compile"
usage() { sed -n '2,/^# Exit status/p' "$0"; }
while [ -z "$INTERNAL_STEP" ] && [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR="${2:-}"; shift ;;
    --deadline) DEADLINE="${2:-}"; shift ;;
    --only) ONLY="${2:-}"; shift ;;
    --skip) SKIP="${2:-}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$DEADLINE" in ''|*[!0-9]*) echo "gpu_check.sh: --deadline must be whole seconds, got '$DEADLINE'" >&2; exit 2 ;; esac
for s in ${ONLY//,/ } ${SKIP//,/ }; do
  case " $ALL_STEPS " in *" $s "*) ;; *) echo "gpu_check.sh: unknown step '$s' (steps: $ALL_STEPS)" >&2; exit 2 ;; esac
done
# For tests: GPU_CHECK_STEP_LIMITS="train60=3,bench=2" lowers those steps' hard limits.
GPU_CHECK_STEP_LIMITS="${GPU_CHECK_STEP_LIMITS:-}"
for pair in ${GPU_CHECK_STEP_LIMITS//,/ }; do
  case "$pair" in
    *=*[!0-9]*|*=) echo "gpu_check.sh: GPU_CHECK_STEP_LIMITS: '$pair' is not STEP=SECONDS" >&2; exit 2 ;;
    *=*) case " $ALL_STEPS " in *" ${pair%%=*} "*) ;; *)
           echo "gpu_check.sh: GPU_CHECK_STEP_LIMITS: unknown step '${pair%%=*}'" >&2; exit 2 ;; esac ;;
    *) echo "gpu_check.sh: GPU_CHECK_STEP_LIMITS: '$pair' is not STEP=SECONDS" >&2; exit 2 ;;
  esac
done

if [ -n "$INTERNAL_STEP" ]; then
  DRY=$GC_DRY GPU=$GC_GPU OUT_DIR=$GC_OUT WORK=$GC_WORK PY=$GC_PY MODE=$GC_MODE ONLY=$GC_ONLY SKIP=$GC_SKIP
else
  [ -n "$OUT_DIR" ] || OUT_DIR="$(mktemp -d /tmp/gpu_check.XXXXXX)"
  mkdir -p "$OUT_DIR" || exit 2
  OUT_DIR="$(cd "$OUT_DIR" && pwd)"
  WORK="$(mktemp -d /tmp/gpu_check_work.XXXXXX)"   # intermediate files, never returned
  PY=""
  for candidate in "${PYTHON:-}" python3 python; do
    if [ -n "$candidate" ] && "$candidate" -c "import torch" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
  if [ -z "$PY" ]; then echo "gpu_check.sh: no python with torch found (set PYTHON=...)" >&2; exit 2; fi
  GPU=0
  if [ "$DRY" = 0 ] && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then GPU=1; fi
  MODE=$([ "$DRY" = 1 ] && echo "dry run (CPU)" || echo "GPU")
  [ "$DRY" = 0 ] && [ "$GPU" = 0 ] && MODE="GPU requested, but torch sees no CUDA device"
  COMMIT="${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
  if [ -n "$COMMIT" ]; then export GPU_CHECK_COMMIT="$COMMIT"; else COMMIT=unknown; fi
  export GC_DRY="$DRY" GC_GPU="$GPU" GC_OUT="$OUT_DIR" GC_WORK="$WORK" GC_PY="$PY" GC_MODE="$MODE" \
    GC_ONLY="$ONLY" GC_SKIP="$SKIP"
  # every benchmark row of this run goes to WORK (collected into bench.json), none to bench/results/
  export SEPICO_FAST_BENCH_RESULTS_DIR="$WORK/bench_rows"
fi
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.txt"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # the checkout's own code, installed or not
export PYTHONUNBUFFERED=1
EXT_STAMP="sepico_fast/ops/_C.sources.sha256"

elapsed() { echo $(( $(date +%s) - START )); }
has_module() { "$PY" -c "import $1" >/dev/null 2>&1; }

selected() { # selected STEP: not excluded by --only / --skip
  { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; } && [[ ",$SKIP," != *",$1,"* ]]
}

limit_override() {  # the GPU_CHECK_STEP_LIMITS entry of a step, if any
  local pair
  for pair in ${GPU_CHECK_STEP_LIMITS//,/ }; do [ "${pair%%=*}" = "$1" ] && echo "${pair#*=}"; done
}

# run_step NAME ESTIMATE [bg] [min=SECONDS]: deadline check, hard limit, one summary line.
#   bg           run in the background; join_step NAME waits for it and writes its line
#   min=SECONDS  a partial step (its rows are kept as they come): starts when SECONDS fit,
#                and a stop at its limit is PARTIAL, not FAIL
run_step() {
  local name="$1" estimate="$2" bg=0 least="$2" partial=0 left limit override arg
  shift 2
  for arg in "$@"; do
    case "$arg" in bg) bg=1 ;; min=*) least="${arg#min=}"; partial=1 ;; esac
  done
  rm -f "$WORK/line.$name" "$WORK/rc.$name"
  left=$(( DEADLINE - $(elapsed) ))
  if ! selected "$name"; then
    printf '%-16s SKIPPED  %4ss  not selected (--only/--skip)\n' "$name" 0 >"$WORK/line.$name"
  elif [ "$least" -gt "$left" ]; then
    printf '%-16s SKIPPED  %4ss  needs ~%ss, %ss left of the %ss deadline\n' "$name" 0 "$least" "$left" \
      "$DEADLINE" >"$WORK/line.$name"
  else
    limit=$(( 2 * estimate + 30 ))
    [ "$limit" -le "$left" ] || limit=$left
    override=$(limit_override "$name")
    if [ -n "$override" ] && [ "$override" -lt "$limit" ]; then limit=$override; fi
    echo "$limit $partial $(date +%s)" >"$WORK/meta.$name"
    if [ "$bg" = 1 ]; then
      printf '\n===== %s started in the background (estimate %ss, limit %ss, %ss left); its log follows when it ends\n' \
        "$name" "$estimate" "$limit" "$left" >>"$LOG"
      ( timeout -k 5 "$limit" bash "$SELF" __step "$name" >"$WORK/log.$name" 2>&1 </dev/null
        echo $? >"$WORK/rc.$name" ) &
      echo $! >"$WORK/bgpid.$name"
      return
    fi
    printf '\n===== %s (estimate %ss, limit %ss, %ss left) =====\n' "$name" "$estimate" "$limit" "$left" >>"$LOG"
    timeout -k 5 "$limit" bash "$SELF" __step "$name" >>"$LOG" 2>&1 </dev/null
    echo $? >"$WORK/rc.$name"
    finish_step "$name"
  fi
  [ "$bg" = 1 ] || emit_line "$name"
}

join_step() {  # join_step NAME: wait for a background step, append its log, write its line
  local name="$1"
  if [ -f "$WORK/bgpid.$name" ]; then
    wait "$(cat "$WORK/bgpid.$name")" 2>/dev/null
    rm -f "$WORK/bgpid.$name"
    printf '\n===== %s (ran in the background) =====\n' "$name" >>"$LOG"
    cat "$WORK/log.$name" >>"$LOG" 2>/dev/null
    finish_step "$name"
  fi
  emit_line "$name"
}

finish_step() {  # the status line of a step that ran, from its exit code and its note
  local name="$1" limit partial t0 rc dt status note
  read -r limit partial t0 <"$WORK/meta.$name"
  rc=$(cat "$WORK/rc.$name" 2>/dev/null || echo 1)
  dt=$(( $(date +%s) - t0 ))
  note="$(head -c 200 "$WORK/note.$name" 2>/dev/null || true)"
  case "$rc" in
    0) status=PASS ;;
    77) status=SKIPPED ;;
    124|137) if [ "$partial" = 1 ]; then status=PARTIAL; note="stopped at its ${limit}s limit, what it finished is kept${note:+; $note}"
             else status=FAIL; note="stopped after ${limit}s${note:+; $note}"; fi ;;
    *) status=FAIL; note="exit $rc${note:+; $note}" ;;
  esac
  [ "$status" = FAIL ] && FAILED=1
  printf '%-16s %-7s  %4ss  %s\n' "$name" "$status" "$dt" "$note" >"$WORK/line.$name"
}

emit_line() { [ -f "$WORK/line.$1" ] && tee -a "$SUMMARY" <"$WORK/line.$1"; rm -f "$WORK/line.$1"; }
note() { echo "$*" >"$WORK/note.$CURRENT"; }   # one-line detail for the summary
skip() { note "$*"; exit 77; }
last_count_line() { grep -E '[0-9]+ (passed|failed|error|skipped|deselected|tests? collected)' "$1" | tail -1; }

# ---------------------------------------------------------------------------------- steps
step_env() {
  CURRENT=env
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || echo "nvidia-smi: not available"
  command -v nvcc >/dev/null && nvcc --version | tail -2
  for tool in cmake ninja ncu compute-sanitizer nsys; do printf '%s: %s\n' "$tool" "$(command -v $tool || echo missing)"; done
  "$PY" -m sepico_fast._cuda_toolkit; local toolkit_rc=$?
  "$PY" - "$OUT_DIR/env.json" "$MODE" "${GPU_CHECK_COMMIT:-unknown}" <<'EOF'
import json, platform, sys
from importlib import metadata
import torch
info = {"mode": sys.argv[2], "commit": sys.argv[3], "python": sys.version.split()[0],
        "platform": platform.platform(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
for mod in ("triton", "numpy", "pytest", "xdist", "pytest_timeout", "nvidia.dali"):
    try:
        m = __import__(mod, fromlist=["__version__"])
        info[mod] = getattr(m, "__version__", "present")
    except Exception as exc:
        info[mod] = f"missing ({type(exc).__name__})"
for dist in ("pip", "setuptools"):  # what an editable install would run (pyproject.toml, PEP 660)
    try:
        info[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        info[dist] = "missing"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1),
                bf16_native=torch.cuda.is_bf16_supported(including_emulation=False))
from sepico_fast import _cuda_toolkit as tk
choice = tk.find_cuda_home(torch_cuda=torch.version.cuda)
info["cuda_toolkit"] = choice.describe()
info["extension_archs"] = tk.archs_text()
from sepico_fast.train.implementations import implementation_lines
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
info["implementations_before_build"] = implementation_lines(dev)
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF
  local rc=$?
  note "$("$PY" -c "import json; d=json.load(open('$OUT_DIR/env.json')); print(d.get('device', 'no GPU'), '| torch', d['torch'], '| triton', d['triton'], '| pip', d['pip'], '| setuptools', d['setuptools'], '|', d['cuda_toolkit'][:70])" 2>/dev/null)"
  [ "$rc" = 0 ] || return "$rc"
  if [ "$DRY" = 0 ] && [ "$GPU" = 0 ]; then note "torch sees no CUDA device: every GPU step is skipped"; return 1; fi
  [ "$GPU" = 1 ] && [ "$toolkit_rc" != 0 ] && return 1
  return 0
}

start_background_jobs() {  # CPU work the tests need, started once the headline numbers are in
  [ "$GPU" = 1 ] || return 0
  if command -v cmake >/dev/null && selected cmake_sanitizer; then
    ( cmake_build ) >"$WORK/cmake.log" 2>&1 &
    echo $! >"$WORK/cmake.pid"
  fi
  if selected train60; then
    ( "$PY" -c "from sepico_fast.data.synthetic import ensure_synthetic; ensure_synthetic()"; echo "synthetic exit $?" ) \
      >"$WORK/synthetic.log" 2>&1 &
    echo $! >"$WORK/synthetic.pid"
  fi
}

cmake_build() (  # a subshell: the trace stays inside
  home="$("$PY" -c 'from sepico_fast._cuda_toolkit import find_cuda_home as f; print(f().home or "")' 2>/dev/null)"
  if [ -z "$home" ]; then
    echo "cmake skipped: no CUDA toolkit found (python -m sepico_fast._cuda_toolkit says where it looked)"
    exit 0
  fi
  set -x
  cmake -S "$ROOT" -B "$WORK/cmake" -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_COMPILER="$home/bin/nvcc" \
    && cmake --build "$WORK/cmake" -j 8
  echo "cmake exit $?"
)

wait_for() {  # wait_for synthetic|cmake: a background job of start_background_jobs (or none)
  local pidfile="$WORK/$1.pid"
  [ -f "$pidfile" ] || return 0
  while kill -0 "$(cat "$pidfile")" 2>/dev/null; do sleep 1; done
  cat "$WORK/$1.log" 2>/dev/null
}

ext_sources_hash() {  # what the built extension depends on: its sources, the build script, torch
  { "$PY" -c "import sys; from importlib import metadata as m; print(m.version('torch'), sys.version)" 2>&1
    cat setup.py sepico_fast/_cuda_toolkit.py csrc/*.cu csrc/*.cpp csrc/*.h csrc/*.cuh 2>/dev/null
  } | sha256sum | cut -c1-32
}

ext_is_current() {  # a built extension whose stamp matches the sources (mtimes do not survive copies)
  ls sepico_fast/ops/_C*.so >/dev/null 2>&1 && [ -f "$EXT_STAMP" ] && [ "$(cat "$EXT_STAMP")" = "$(ext_sources_hash)" ]
}

ext_state() {  # what setup.py recorded: built / skipped / failed (or nothing)
  "$PY" -c "import json; print(json.load(open('sepico_fast/ops/_ext_build.json'))['state'])" 2>/dev/null
}

step_build() {
  CURRENT=build
  if [ "$DRY" = 1 ]; then  # the real command: on a CPU build of torch it must refuse
    SEPICO_FAST_REQUIRE_EXT=1 "$PY" setup.py build_ext --inplace >"$WORK/build.out" 2>&1
    local rc=$?
    tail -3 "$WORK/build.out"
    if [ "$rc" = 0 ] || ! grep -q "SEPICO_FAST_REQUIRE_EXT=1 but the CUDA extension cannot be built" "$WORK/build.out"; then
      note "setup.py build_ext --inplace did not refuse SEPICO_FAST_REQUIRE_EXT=1 on a CPU torch (exit $rc)"; return 1
    fi
    skip "dry run: setup.py build_ext --inplace refuses SEPICO_FAST_REQUIRE_EXT=1 on this CPU torch, as it must"
  fi
  [ "$GPU" = 1 ] || skip "no CUDA device (nothing is built)"
  local how
  if ext_is_current; then
    how="reused (its stamp matches the sources)"
    echo "extension already built for these sources: $(ls sepico_fast/ops/_C*.so)"
  else
    export SEPICO_FAST_REQUIRE_EXT=1 MAX_JOBS="${MAX_JOBS:-12}"  # the kernel rows run meanwhile
    rm -f sepico_fast/ops/_C*.so sepico_fast/ops/_ext_build.json "$EXT_STAMP"
    how="built in place (setup.py build_ext --inplace)"
    "$PY" setup.py build_ext --inplace 2>&1 | tee "$WORK/build.out"
    local rc=${PIPESTATUS[0]}
    # pip only when setuptools, not the compiler or a missing toolkit, stopped the build
    if [ "$rc" != 0 ] && [ "$(ext_state)" != failed ] \
        && ! grep -q "SEPICO_FAST_REQUIRE_EXT=1 but the CUDA extension cannot be built" "$WORK/build.out"; then
      echo "setup.py build_ext failed before compiling (exit $rc): trying pip install -e ."
      how="pip install -e . (setup.py build_ext failed before compiling)"
      "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e .
      rc=$?
    fi
    cat sepico_fast/ops/_ext_build.json 2>/dev/null
    if [ "$rc" != 0 ]; then
      note "$(head -c 180 sepico_fast/ops/_ext_build.json 2>/dev/null \
              || grep -o 'RuntimeError: SEPICO_FAST_REQUIRE_EXT=1 but.*' "$WORK/build.out" | tail -1 | grep . || echo "exit $rc")"
      return 1
    fi
  fi
  "$PY" - <<'EOF' || { note "$how, but it does not load"; return 1; }
import torch
from sepico_fast import ops
from sepico_fast.train.implementations import implementation_lines
print("extension:", ops.EXTENSION_AVAILABLE, ops.EXTENSION_STATUS)
print("\n".join(implementation_lines(torch.device("cuda"))))
assert ops.EXTENSION_AVAILABLE, ops.EXTENSION_STATUS
EOF
  ext_sources_hash >"$EXT_STAMP"
  tar -cf "$OUT_DIR/ext_build.tar" sepico_fast/ops/_C*.so "$EXT_STAMP" \
    $(ls sepico_fast/ops/_ext_build.json 2>/dev/null) && tar -tf "$OUT_DIR/ext_build.tar"
  note "$how; ext_build.tar holds $(tar -tf "$OUT_DIR/ext_build.tar" | tr '\n' ' ')"
}

pytest_args() {  # pytest_args WORKERS: parallel and per-test timeouts where the plugins are installed
  local args=(-q -p no:cacheprovider -rs)
  if [ "$GPU" = 1 ] && [ "${1:-1}" -gt 1 ] && has_module xdist; then args+=(-n "$1"); fi
  if has_module pytest_timeout; then args+=(--timeout 300); fi
  echo "${args[@]}"
}

run_tests() {  # run_tests WORKERS -k EXPR FILES...: collected only in a dry run, else run on the GPU
  local workers="$1" out="$WORK/tests.$CURRENT"
  shift
  if [ "$DRY" = 1 ]; then  # the same selection, collected: a renamed test fails the dry run
    "$PY" -m pytest --collect-only -q -p no:cacheprovider "$@" >"$out" 2>&1
    local rc=$?
    tail -3 "$out"
    [ "$rc" = 0 ] || { note "collection failed: $(tail -1 "$out")"; return 1; }
    skip "dry run: $(last_count_line "$out"), not run (CI runs the CPU cases)"
  fi
  [ "$GPU" = 1 ] || skip "no CUDA device"
  "$PY" -m pytest $(pytest_args "$workers") "$@" 2>&1 | tee "$out"
  local rc=${PIPESTATUS[0]}
  note "$(last_count_line "$out")"
  return "$rc"
}

step_triton_tests() {  # the Triton kernels alone: the extension stays out of the way
  CURRENT=triton_tests
  SEPICO_FAST_DISABLE_EXT=1 run_tests 6 tests/test_triton_contrast.py tests/test_triton_class_moments.py \
    tests/test_kernels_compile.py \
    tests/test_triton_interpreter_compat.py::test_loop_over_a_program_id_runs_in_the_interpreter \
    tests/test_contrast_stats.py::test_no_host_sync_on_cuda \
    tests/test_bench_timing.py::test_graph_timing_on_cuda_and_capture_failures_are_reported
}

step_ext_tests() {
  CURRENT=ext_tests
  run_tests 3 tests/test_ops_cuda.py tests/test_train_resume.py::test_resume_on_cuda_within_tolerance
}

step_no_host_sync() {
  CURRENT=no_host_sync
  [ -f tests/test_no_host_sync.py ] || skip "tests/test_no_host_sync.py is not in this checkout"
  run_tests 3 tests/test_no_host_sync.py -k cuda
}

# The headline: one step run eager and with --cuda-graphs, then (its own step: the inductor
# compile takes a while) with --compile; the other variants come after the tests.
MORE_VARIANTS="fp16_dist_scaler,bf16_bank_full,bf16_proto"

run_probe() {  # run_probe VARIANTS [--merge]: scripts/gpu_step_probe.py into step_probe.json
  local variants="$1" args=(--out "$OUT_DIR/step_probe.json" --variants "$1") v line notes=""
  shift
  args+=("$@")
  [ "$DRY" = 1 ] && args+=(--tiny)
  [ "$DRY" = 1 ] || [ "$GPU" = 1 ] || skip "no CUDA device"
  "$PY" scripts/gpu_step_probe.py "${args[@]}" 2>&1 | tee "$WORK/probe.$CURRENT"
  local rc=${PIPESTATUS[0]}
  for v in ${variants//,/ }; do  # this step's table lines: variant ms/iter b2b busy wall/busy img/s ...
    line="$(grep -E "^$v " "$WORK/probe.$CURRENT" | tail -1 | tr -s ' ' | cut -c1-64)"
    [ -n "$line" ] && notes="${notes:+$notes | }$line"
  done
  note "$notes"
  return "$rc"
}

step_step_probe() {
  CURRENT=step_probe
  run_probe bf16_dist,bf16_dist_graphs
}

step_probe_compiled() {
  CURRENT=probe_compiled
  run_probe bf16_dist_compiled --merge
}

step_probe_more() {
  CURRENT=probe_more
  if [ "$DRY" = 1 ]; then run_probe bf16_bank_full --merge; else run_probe "$MORE_VARIANTS" --merge; fi
}

step_train60() {
  CURRENT=train60
  local iters=60 extra=(--nvtx --profile --profile-iters 10 --log-interval 20 --contrast-start 20 --eval-max-images 20)
  if [ "$DRY" = 1 ]; then iters=2; extra=(--profile --profile-iters 1 --log-interval 1 --contrast-start 1 --eval-max-images 2); fi
  [ "$DRY" = 1 ] || [ "$GPU" = 1 ] || skip "no CUDA device"
  wait_for synthetic
  "$PY" -m sepico_fast.train --amp --iters "$iters" "${extra[@]}" --eval-interval 0 \
    --checkpoint-interval 0 --debug-interval 0 --work-dir "$WORK/train60" || return 1
  note "$("$PY" -c "import json; m=json.load(open('$WORK/train60/metrics.json')); print('mIoU', m.get('miou'), '| precision', str(m.get('precision'))[:24], '| train_s', m.get('train_seconds'), '| skipped', m.get('skipped_steps'), '| ran alongside the tests')" 2>/dev/null)"
}

step_cmake_sanitizer() {
  CURRENT=cmake_sanitizer
  [ "$DRY" = 0 ] || skip "dry run: the test suite builds csrc/ with CMake (tests/test_cmake_build.py)"
  [ "$GPU" = 1 ] || skip "no CUDA device"
  command -v cmake >/dev/null || skip "cmake not installed"
  if [ -f "$WORK/cmake.pid" ]; then wait_for cmake; else cmake_build >"$WORK/cmake.log" 2>&1; cat "$WORK/cmake.log"; fi
  if grep -q "^cmake skipped" "$WORK/cmake.log"; then skip "$(grep -m1 '^cmake skipped' "$WORK/cmake.log")"; fi
  grep -q "cmake exit 0" "$WORK/cmake.log" || { note "CMake build failed"; return 1; }
  ctest --test-dir "$WORK/cmake" --output-on-failure || { note "ctest failed"; return 1; }
  command -v compute-sanitizer >/dev/null || { note "ctest passed; compute-sanitizer not installed"; return 0; }
  local bad="" t tool rc
  for t in test_crop_scores test_classmix test_pseudo_label; do
    for tool in memcheck racecheck; do
      echo "--- compute-sanitizer --tool $tool $t"
      compute-sanitizer --tool "$tool" --error-exitcode 99 "$WORK/cmake/$t"
      rc=$?
      [ "$rc" = 0 ] || bad="$bad $tool:$t(exit $rc)"
    done
  done
  [ -z "$bad" ] || { note "sanitizer:$bad"; return 1; }
  note "ctest + memcheck + racecheck clean on 3 tests"
}

# One CPU row of each bench file that has a cheap one, run for real in the dry run (with
# tests/test_undefined_names.py, this is what keeps GPU-only bench code from rotting);
# test_bench_pipeline.py and test_bench_train_step.py are only collected: their smallest
# CPU rows take 30-100 s on CI's two cores.
BENCH_SMOKE_ROWS_bench="bench/test_bench_kernels.py::test_bench[proto_contrast_fwd_bwd-torch-12800-cpu] \
bench/test_bench_kernels.py::test_bench[bank_contrast_fwd_bwd-upstream-12800-cpu] \
bench/test_bench_contrast_reference.py::test_distcl_fwd_bwd[cpu]"
BENCH_SMOKE_ROWS_bench_ops="bench/test_bench_ops.py::test_bench_classmix[torch-cpu]"

run_bench() {  # run_bench -k EXPR FILES...: the GPU rows, recorded into WORK (see bench.json)
  if [ "$DRY" = 1 ]; then
    "$PY" -m pytest --collect-only -q -p no:cacheprovider "$@" >"$WORK/bench.$CURRENT" 2>&1 \
      || { tail -3 "$WORK/bench.$CURRENT"; note "collection failed"; return 1; }
    tail -1 "$WORK/bench.$CURRENT"
    local smoke_var="BENCH_SMOKE_ROWS_$CURRENT"
    [ -n "${!smoke_var:-}" ] || skip "dry run: $(last_count_line "$WORK/bench.$CURRENT"), not run"
    SEPICO_FAST_BENCH_RECORD=1 "$PY" -m pytest -q -p no:cacheprovider -rs -s ${!smoke_var} 2>&1 \
      | tee "$WORK/smoke.out"
    local rc=${PIPESTATUS[0]}
    note "dry run: GPU rows collected; smoke CPU rows: $(last_count_line "$WORK/smoke.out")"
    return "$rc"
  fi
  [ "$GPU" = 1 ] || skip "no CUDA device"
  SEPICO_FAST_BENCH_RECORD=1 "$PY" -m pytest -q -p no:cacheprovider -rs -s "$@" 2>&1 | tee "$WORK/bench.$CURRENT"
  local rc=${PIPESTATUS[0]}
  note "$(last_count_line "$WORK/bench.$CURRENT")"
  return "$rc"
}

step_bench() {  # runs during the build: the extension must not be loaded half-written
  CURRENT=bench
  SEPICO_FAST_DISABLE_EXT=1 run_bench -k "cuda and not 12800 and not 204800 and not torch_compile" \
    bench/test_bench_kernels.py
}

step_bench_ops() {
  CURRENT=bench_ops
  run_bench -k "cuda" bench/test_bench_ops.py
}

step_bench_compile() {
  CURRENT=bench_compile
  run_bench -k "cuda and 51200 and torch_compile" bench/test_bench_kernels.py
}

step_train_step() {  # the bf16 row: fast (bf16) vs upstream (fp32) vs upstream TF32 + foreach AdamW
  CURRENT=train_step
  grep -qs "upstream_step" bench/test_bench_train_step.py \
    || skip "bench/test_bench_train_step.py has no upstream-dataflow rows in this checkout"
  run_bench -k "cuda and mitb5 and eager and bf16" bench/test_bench_train_step.py
}

step_train_step_more() {
  CURRENT=train_step_more
  run_bench -k "cuda and mitb5 and eager and fp32" bench/test_bench_train_step.py
}

# ------------------------------------------------------------- results, built by this shell
collect_bench_json() {  # every row recorded so far, whatever became of the steps
  "$PY" - "$WORK/bench_rows" "$OUT_DIR/bench.json" <<'EOF'
import json, sys
from pathlib import Path
rows = []
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    try:
        rows += json.loads(path.read_text())
    except ValueError as exc:  # recorded by an atomic replace: should not happen
        print(f"unreadable {path.name}: {exc}")
tmp = Path(sys.argv[2] + ".tmp")
tmp.write_text(json.dumps(rows, indent=1) + "\n")
tmp.replace(sys.argv[2])
EOF
}

collect_train_json() {  # what the 60-iteration run left, complete or not
  "$PY" - "$WORK/train60" "$OUT_DIR/train.json" "$(cat "$WORK/rc.train60" 2>/dev/null || echo none)" <<'EOF'
import json, sys
from pathlib import Path
run, rc = Path(sys.argv[1]), sys.argv[3]

def read(rel, parse):
    try:
        return parse((run / rel).read_text())
    except (OSError, ValueError):
        return None

out = {"exit": rc, "complete": (run / "metrics.json").exists(),
       "metrics": read("metrics.json", json.loads),
       "phases": read("profile/phases.txt", str.splitlines),
       "scalars": read("scalars.jsonl", lambda t: [json.loads(l) for l in t.splitlines() if l.strip()]),
       "trace": str(run / "profile" / "trace.json") + " (on the machine, not returned)"}
Path(sys.argv[2]).write_text(json.dumps(out, indent=1) + "\n")
EOF
}

print_results() {  # the numbers that matter, at the end of the output (the tool returns its tail)
  "$PY" - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    probe = json.loads((out / "step_probe.json").read_text())
except (OSError, ValueError):
    probe = None
if probe and probe.get("variants"):
    print(f"step probe ({probe['device']}): variant, ms/iter, b2b ms, GPU-busy ms, wall/busy, img/s, host syncs/step, "
          "peak GB, MFU")
    for name, r in probe["variants"].items():
        if "error" in r or "skipped" in r:
            print(f"  {name:<18} {'ERROR ' + r['error'][:100] if 'error' in r else r['skipped'][:100]}")
            continue
        mfu = r.get("mfu_counted") or r.get("mfu_documented")
        print(f"  {name:<18} {r['ms_per_iter_median']:>8} {r['ms_per_iter_back_to_back']:>8} "
              f"{r.get('gpu_busy_ms_per_iter')!s:>7} {r.get('wall_over_busy')!s:>6} {r.get('images_per_s')!s:>7}"
              f" {r['host_syncs_per_step']!s:>6} {r['peak_mem_gb']!s:>6} {'n/a' if mfu is None else f'{100 * mfu:.1f}%':>6}")
try:
    rows = json.loads((out / "bench.json").read_text())
except (OSError, ValueError):
    rows = []
if rows:
    print("benchmark rows: bench, impl, device, N or shape, ms, GB/s, % of copy bandwidth")
    for r in rows:
        shape = r.get("shape") or {}
        size = shape.get("N") or " ".join(f"{k}={v}" for k, v in shape.items() if k != "dtype")
        print(f"  {r['bench']:<24} {r['impl']:<17} {r['device'].split(' (')[0][:14]:<14} {size!s:<22} {r['median_ms']:>9} "
              f"{r.get('gbps')!s:>8} {r.get('roofline_pct')!s:>6}")
EOF
}

# ---------------------------------------------------------------------------------- run
if [ -n "$INTERNAL_STEP" ]; then
  CURRENT="$INTERNAL_STEP"
  "step_$INTERNAL_STEP"
  exit $?
fi
: >"$LOG"
: >"$SUMMARY"
FAILED=0
{
  echo "sepico_fast gpu_check: $MODE, deadline ${DEADLINE}s, commit $COMMIT, $(date -u +%FT%TZ)"
  echo "python: $PY; output: $OUT_DIR"
} | tee -a "$SUMMARY" "$LOG"
est() { [ "$DRY" = 1 ] && echo "$1" || echo "$2"; }   # est DRY_SECONDS GPU_SECONDS
# --- the headline numbers: probe, kernel rows, train_step rows
run_step env 15
if [ "$DRY" = 0 ] && ext_is_current; then BUILD_EST=10; else BUILD_EST=$(est 15 90); fi
run_step build "$BUILD_EST" bg
run_step bench "$(est 45 60)" min="$(est 30 30)"
collect_bench_json
join_step build
run_step step_probe "$(est 45 60)" min="$(est 20 40)"
run_step train_step "$(est 15 60)" min="$(est 10 45)"
collect_bench_json
run_step probe_compiled "$(est 60 90)" min="$(est 20 60)"
run_step bench_ops "$(est 20 30)" min="$(est 10 15)"
collect_bench_json
# --- the tests (train60 and the CMake/sanitizer run alongside them)
start_background_jobs
run_step cmake_sanitizer "$(est 10 60)" bg
run_step train60 "$(est 60 60)" bg
run_step triton_tests "$(est 20 75)"
run_step ext_tests "$(est 15 40)"
run_step no_host_sync "$(est 15 35)"
join_step cmake_sanitizer
join_step train60
[ -f "$WORK/meta.train60" ] && collect_train_json
# --- the rest of the measurements
run_step probe_more "$(est 60 90)" min="$(est 20 40)"
run_step train_step_more "$(est 15 60)" min="$(est 10 45)"
collect_bench_json
run_step bench_compile "$(est 15 150)" min="$(est 10 45)"
collect_bench_json
echo "total $(elapsed)s; full log: $LOG" | tee -a "$SUMMARY"
print_results
# the log must come back (16 MiB per returned file): keep its end when it is larger
if [ "$(wc -c <"$LOG")" -gt 15000000 ]; then tail -c 15000000 "$LOG" >"$WORK/log.tail" && mv "$WORK/log.tail" "$LOG"; fi
for pidfile in "$WORK"/*.pid "$WORK"/bgpid.*; do [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null; done
wait 2>/dev/null
rm -rf "$WORK"
exit "$FAILED"
