#!/usr/bin/env bash
# The one prepared GPU check of sepico_fast (issue 11): one command, no internet.
#
#   bash scripts/gpu_check.sh                      # on the GPU machine; results in $OUT
#   bash scripts/gpu_check.sh --dry-run            # the same script on a CPU (CI), ~1 minute
#   bash scripts/gpu_check.sh --out DIR --deadline 450 --only env,build,gpu_tests --skip bench
#
# Writes into the output folder ($OUT, else --out, else a new temporary folder), at most
# 8 files, none in sub-folders:
#   summary.txt      PASS / FAIL / SKIPPED per step, seconds taken, the reason of a skip
#   gpu_check.log    the full output of every step
#   env.json         device, driver, versions, the CUDA toolkit check
#   step_probe.json  scripts/gpu_step_probe.py (paper-size step: implementations, syncs, ms, memory, MFU)
#   bench.json       the benchmark rows recorded by this run (bench/results/*.json, new rows only)
#   train.json       the 60-iteration run: metrics, per-phase profile table, logged scalars
#
# Steps, in this order (most valuable first; each has a time estimate and is SKIPPED, saying
# so, when it no longer fits before the deadline; a failing step never stops the others):
#   env              device, versions, `python -m sepico_fast._cuda_toolkit`
#   build            pip install --no-build-isolation --no-deps --no-index -e . with
#                    SEPICO_FAST_REQUIRE_EXT=1 (reused when the built extension is newer than csrc/)
#   gpu_tests        extension vs torch (tests/test_ops_cuda.py); compiled Triton kernels vs
#                    float64 in fp32/bf16/fp16 (tests/test_triton_*.py); CUDA host-sync checks
#   no_host_sync     tests/test_no_host_sync.py (skipped when this checkout has no such file)
#   step_probe       scripts/gpu_step_probe.py: DAFormer MiT-B5, crop 640, batch 2+2
#   train60          python -m sepico_fast.train --amp, 60 iterations, --nvtx --profile
#   cmake_sanitizer  CMake build + ctest + compute-sanitizer memcheck and racecheck of csrc/tests
#   bench            pytest bench/ (kernel rows at N = 51,200 and the pixel-op rows), recorded
#
# --dry-run runs every step on the CPU, GPU steps collected but not run or at a tiny size,
# so that CI (.ci/run) keeps the script from rotting. Exit status: 1 when a step FAILED.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
SELF="$ROOT/scripts/gpu_check.sh"

# Internal: `gpu_check.sh __step NAME` runs one step in a fresh process (started by run_step
# under `timeout`, which stops the step and everything it started at the deadline). The
# state comes from the environment (GC_*), the step functions from this file.
if [ "${1:-}" = "__step" ]; then
  INTERNAL_STEP="$2"
else
  INTERNAL_STEP=""
fi

DRY=0
DEADLINE=450
OUT_DIR="${OUT:-}"
ONLY=""
SKIP=""
ALL_STEPS="env build gpu_tests no_host_sync step_probe train60 cmake_sanitizer bench"
usage() { sed -n '2,35p' "$0"; }
while [ -z "$INTERNAL_STEP" ] && [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --deadline) DEADLINE="$2"; shift ;;
    --only) ONLY="$2"; shift ;;
    --skip) SKIP="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$DEADLINE" in ''|*[!0-9]*) echo "gpu_check.sh: --deadline must be whole seconds, got '$DEADLINE'" >&2; exit 2 ;; esac
for s in ${ONLY//,/ } ${SKIP//,/ }; do
  case " $ALL_STEPS " in *" $s "*) ;; *) echo "gpu_check.sh: unknown step '$s' (steps: $ALL_STEPS)" >&2; exit 2 ;; esac
done
if [ -n "$INTERNAL_STEP" ]; then
  DRY=$GC_DRY GPU=$GC_GPU OUT_DIR=$GC_OUT WORK=$GC_WORK PY=$GC_PY MODE=$GC_MODE
  ONLY=$GC_ONLY SKIP=$GC_SKIP
else
  [ -n "$OUT_DIR" ] || OUT_DIR="$(mktemp -d /tmp/gpu_check.XXXXXX)"
  mkdir -p "$OUT_DIR" || exit 2
  OUT_DIR="$(cd "$OUT_DIR" && pwd)"
  WORK="$(mktemp -d /tmp/gpu_check_work.XXXXXX)"   # big intermediate files, never returned
  PY=""
  for candidate in "${PYTHON:-}" python3 python; do
    if [ -n "$candidate" ] && "$candidate" -c "import torch" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
  if [ -z "$PY" ]; then echo "gpu_check.sh: no python with torch found (set PYTHON=...)" >&2; exit 2; fi
  GPU=0
  if [ "$DRY" = 0 ] && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then GPU=1; fi
  MODE=$([ "$DRY" = 1 ] && echo "dry run (CPU)" || echo "GPU")
  [ "$DRY" = 0 ] && [ "$GPU" = 0 ] && MODE="GPU requested, but torch sees no CUDA device"
  export GC_DRY="$DRY" GC_GPU="$GPU" GC_OUT="$OUT_DIR" GC_WORK="$WORK" GC_PY="$PY" GC_MODE="$MODE" \
    GC_ONLY="$ONLY" GC_SKIP="$SKIP"
fi
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.txt"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # the checkout's own code, installed or not
export PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - START )); }
has_pytest_plugin() { "$PY" -c "import $1" >/dev/null 2>&1; }

selected() { # selected STEP: not excluded by --only / --skip
  { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; } && [[ ",$SKIP," != *",$1,"* ]]
}

# run_step NAME ESTIMATE_SECONDS: deadline check, hard limit, one PASS/FAIL/SKIPPED line.
run_step() {
  local name="$1" estimate="$2" left rc t0 dt status note
  if ! selected "$name"; then
    printf '%-16s SKIPPED  %4ss  not selected (--only/--skip)\n' "$name" 0 | tee -a "$SUMMARY"; return; fi
  left=$(( DEADLINE - $(elapsed) ))
  if [ "$estimate" -gt "$left" ]; then
    printf '%-16s SKIPPED  %4ss  needs ~%ss, %ss left of the %ss deadline\n' "$name" 0 "$estimate" "$left" "$DEADLINE" \
      | tee -a "$SUMMARY"; return; fi
  # a fresh process under `timeout` (what is left, at most twice the estimate + 30 s): a
  # hung step is stopped with everything it started, and the next steps still run
  local limit=$(( 2 * estimate + 30 ))
  [ "$limit" -le "$left" ] || limit=$left
  printf '\n===== %s (estimate %ss, limit %ss, %ss left) =====\n' "$name" "$estimate" "$limit" "$left" >>"$LOG"
  t0=$(date +%s)
  timeout -k 10 "$limit" bash "$SELF" __step "$name" >>"$LOG" 2>&1 </dev/null
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  note="$(head -c 200 "$WORK/note.$name" 2>/dev/null || true)"
  case "$rc" in
    0) status=PASS ;;
    77) status=SKIPPED ;;
    124|137) status=FAIL; note="stopped after ${limit}s${note:+; $note}" ;;
    *) status=FAIL; note="exit $rc${note:+; $note}" ;;
  esac
  [ "$status" = FAIL ] && FAILED=1
  printf '%-16s %-7s  %4ss  %s\n' "$name" "$status" "$dt" "$note" | tee -a "$SUMMARY"
}
note() { echo "$*" >"$WORK/note.$CURRENT"; }   # one-line detail for the summary
skip() { note "$*"; exit 77; }

# ---------------------------------------------------------------------------------- steps
step_env() {
  CURRENT=env
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || echo "nvidia-smi: not available"
  command -v nvcc >/dev/null && nvcc --version | tail -2
  for tool in cmake ninja ncu compute-sanitizer nsys; do printf '%s: %s\n' "$tool" "$(command -v $tool || echo missing)"; done
  "$PY" -m sepico_fast._cuda_toolkit; local toolkit_rc=$?
  "$PY" - "$OUT_DIR/env.json" "$MODE" <<'EOF'
import json, platform, subprocess, sys
import torch
info = {"mode": sys.argv[2], "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
for mod in ("triton", "numpy", "pytest", "xdist", "pytest_timeout", "nvidia.dali"):
    try:
        m = __import__(mod, fromlist=["__version__"])
        info[mod] = getattr(m, "__version__", "present")
    except Exception as exc:
        info[mod] = f"missing ({type(exc).__name__})"
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
  note "$("$PY" -c "import json; d=json.load(open('$OUT_DIR/env.json')); print(d.get('device', 'no GPU'), '| torch', d['torch'], '| triton', d['triton'], '|', d['cuda_toolkit'][:90])" 2>/dev/null)"
  [ "$rc" = 0 ] || return "$rc"
  if [ "$DRY" = 0 ] && [ "$GPU" = 0 ]; then note "torch sees no CUDA device: every GPU step is skipped"; return 1; fi
  [ "$GPU" = 1 ] && [ "$toolkit_rc" != 0 ] && return 1
  return 0
}

start_background_jobs() {  # CPU work that later steps need, overlapped with the build
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
  nvcc="$("$PY" -c 'from sepico_fast._cuda_toolkit import find_cuda_home as f; print(f().home or "")')/bin/nvcc"
  set -x
  cmake -S "$ROOT" -B "$WORK/cmake" -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_COMPILER="$nvcc" \
    && cmake --build "$WORK/cmake" -j 8
  echo "cmake exit $?"
)

wait_for() {  # wait_for synthetic|cmake: a background job of start_background_jobs (or none)
  local pidfile="$WORK/$1.pid"
  [ -f "$pidfile" ] || return 0
  while kill -0 "$(cat "$pidfile")" 2>/dev/null; do sleep 1; done
  cat "$WORK/$1.log" 2>/dev/null
}

ext_is_current() {  # a built extension newer than every source it is built from
  local so
  so=$(ls sepico_fast/ops/_C*.so 2>/dev/null | head -1)
  [ -n "$so" ] || return 1
  [ -z "$(find csrc setup.py sepico_fast/_cuda_toolkit.py -newer "$so" -type f 2>/dev/null | head -1)" ]
}

step_build() {
  CURRENT=build
  if [ "$DRY" = 1 ]; then
    SEPICO_FAST_REQUIRE_EXT=1 "$PY" -c "import sys, setuptools; setuptools.setup = lambda **kw: None; sys.argv = ['setup.py']; exec(open('setup.py').read(), {'__file__': 'setup.py', '__name__': '__main__'})" \
      && { echo "setup.py accepted SEPICO_FAST_REQUIRE_EXT=1 here?"; return 1; }
    skip "dry run: no extension build on the CPU (setup.py refuses SEPICO_FAST_REQUIRE_EXT=1 here, as it must)"
  fi
  [ "$GPU" = 1 ] || skip "no CUDA device (nothing is installed)"
  if ext_is_current; then
    echo "extension already built and newer than csrc/: $(ls sepico_fast/ops/_C*.so)"
    note "reused the built extension (newer than csrc/)"
  else
    export SEPICO_FAST_REQUIRE_EXT=1 MAX_JOBS="${MAX_JOBS:-16}"
    "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e .
    local rc=$?
    cat sepico_fast/ops/_ext_build.json 2>/dev/null
    [ "$rc" = 0 ] || { note "$(cat sepico_fast/ops/_ext_build.json 2>/dev/null | head -c 180)"; return 1; }
  fi
  "$PY" - <<'EOF'
import torch
from sepico_fast import ops
from sepico_fast.train.implementations import implementation_lines
print("extension:", ops.EXTENSION_AVAILABLE, ops.EXTENSION_STATUS)
print("\n".join(implementation_lines(torch.device("cuda"))))
assert ops.EXTENSION_AVAILABLE, ops.EXTENSION_STATUS
EOF
}

pytest_args() {  # parallel and per-test timeouts where the plugins are installed
  local args=(-q -p no:cacheprovider -rs)
  if [ "$GPU" = 1 ] && has_pytest_plugin xdist; then args+=(-n 8); fi
  if has_pytest_plugin pytest_timeout; then args+=(--timeout 300); fi
  echo "${args[@]}"
}

GPU_TESTS="tests/test_ops_cuda.py tests/test_triton_contrast.py tests/test_triton_class_moments.py \
tests/test_triton_interpreter_compat.py tests/test_contrast_stats.py tests/test_bench_timing.py"

step_gpu_tests() {
  CURRENT=gpu_tests
  if [ "$DRY" = 1 ]; then  # the same files and options, collected only
    "$PY" -m pytest --collect-only -q -p no:cacheprovider $GPU_TESTS | tail -3 || return 1
    skip "dry run: collected, not run (interpreter runs are part of the test suite)"
  fi
  [ "$GPU" = 1 ] || skip "no CUDA device"
  "$PY" -m pytest $(pytest_args) $GPU_TESTS 2>&1 | tee "$WORK/gpu_tests.out"
  local rc=${PIPESTATUS[0]}
  note "$(grep -E '(passed|failed|error|skipped)' "$WORK/gpu_tests.out" | tail -1)"
  return "$rc"
}

step_no_host_sync() {
  CURRENT=no_host_sync
  [ -f tests/test_no_host_sync.py ] || skip "tests/test_no_host_sync.py is not in this checkout"
  if [ "$DRY" = 1 ]; then
    "$PY" -m pytest --collect-only -q -p no:cacheprovider tests/test_no_host_sync.py | tail -2 || return 1
    skip "dry run: collected, not run (part of the test suite)"
  fi
  [ "$GPU" = 1 ] || skip "no CUDA device"
  "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_no_host_sync.py 2>&1 | tee "$WORK/nhs.out"
  local rc=${PIPESTATUS[0]}
  note "$(grep -E '(passed|failed|error|skipped)' "$WORK/nhs.out" | tail -1)"
  return "$rc"
}

step_step_probe() {
  CURRENT=step_probe
  local args=(--out "$OUT_DIR/step_probe.json")
  if [ "$DRY" = 1 ]; then args+=(--tiny --variants bf16_dist,bf16_bank_full); fi
  [ "$DRY" = 1 ] || [ "$GPU" = 1 ] || skip "no CUDA device"
  "$PY" scripts/gpu_step_probe.py "${args[@]}" 2>&1 | tee "$WORK/probe.out"
  local rc=${PIPESTATUS[0]}
  note "$(grep -E '^bf16_dist ' "$WORK/probe.out" | tr -s ' ' | head -1)"
  return "$rc"
}

step_train60() {
  CURRENT=train60
  local iters=60 extra=(--nvtx --profile --profile-iters 10 --log-interval 20 --contrast-start 20 --eval-max-images 20)
  if [ "$DRY" = 1 ]; then iters=2; extra=(--profile --profile-iters 1 --log-interval 1 --contrast-start 1 --eval-max-images 2); fi
  [ "$DRY" = 1 ] || [ "$GPU" = 1 ] || skip "no CUDA device"
  wait_for synthetic
  "$PY" -m sepico_fast.train --amp --iters "$iters" "${extra[@]}" --eval-interval 0 \
    --checkpoint-interval 0 --debug-interval 0 --work-dir "$WORK/train60" || return 1
  "$PY" - "$WORK/train60" "$OUT_DIR/train.json" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
out = {"metrics": json.loads((run / "metrics.json").read_text()),
       "phases": (run / "profile" / "phases.txt").read_text().splitlines()
                 if (run / "profile" / "phases.txt").exists() else None,
       "scalars": [json.loads(l) for l in (run / "scalars.jsonl").read_text().splitlines()]
                  if (run / "scalars.jsonl").exists() else None,
       "trace": str(run / "profile" / "trace.json") + " (on the machine, not returned)"}
Path(sys.argv[2]).write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out["metrics"], indent=1))
EOF
  note "$("$PY" -c "import json; m=json.load(open('$OUT_DIR/train.json'))['metrics']; print('mIoU', m.get('miou'), '| precision', str(m.get('precision'))[:24], '| train_s', m.get('train_seconds'), '| skipped', m.get('skipped_steps'))" 2>/dev/null)"
}

step_cmake_sanitizer() {
  CURRENT=cmake_sanitizer
  [ "$DRY" = 0 ] || skip "dry run: the test suite builds csrc/ with CMake (tests/test_cmake_build.py)"
  [ "$GPU" = 1 ] || skip "no CUDA device"
  command -v cmake >/dev/null || skip "cmake not installed"
  if [ -f "$WORK/cmake.pid" ]; then wait_for cmake; else cmake_build >"$WORK/cmake.log" 2>&1; cat "$WORK/cmake.log"; fi
  grep -q "cmake exit 0" "$WORK/cmake.log" || { note "CMake build failed"; return 1; }
  ctest --test-dir "$WORK/cmake" --output-on-failure || { note "ctest failed"; return 1; }
  local bad=""
  if command -v compute-sanitizer >/dev/null; then
    for t in test_crop_scores test_classmix test_pseudo_label; do
      for tool in memcheck racecheck; do
        echo "--- compute-sanitizer --tool $tool $t"
        compute-sanitizer --tool "$tool" --error-exitcode 99 "$WORK/cmake/$t"
        local rc=$?
        [ "$rc" = 0 ] || bad="$bad $tool:$t(exit $rc)"
      done
    done
  else
    note "ctest passed; compute-sanitizer not installed"; return 0
  fi
  [ -z "$bad" ] || { note "sanitizer:$bad"; return 1; }
  note "ctest + memcheck + racecheck clean on 3 tests"
}

step_bench() {
  CURRENT=bench
  local select="cuda and not 12800 and not 204800"   # kernel rows at N = 51,200 + the pixel-op rows
  local rec=()
  grep -qs -- '"--record"' bench/conftest.py && rec=(--record)
  if [ "$DRY" = 1 ]; then
    "$PY" -m pytest --collect-only -q -p no:cacheprovider bench/test_bench_kernels.py bench/test_bench_ops.py \
      -k "$select" | tail -2 || return 1
    skip "dry run: collected, not run"
  fi
  [ "$GPU" = 1 ] || skip "no CUDA device"
  rm -rf "$WORK/results_before"; cp -r bench/results "$WORK/results_before"
  SEPICO_FAST_BENCH_RECORD=1 "$PY" -m pytest -q -p no:cacheprovider -rs -s "${rec[@]}" \
    bench/test_bench_kernels.py bench/test_bench_ops.py -k "$select" 2>&1 | tee "$WORK/bench.out"
  local rc=${PIPESTATUS[0]}
  "$PY" - "$WORK/results_before" bench/results "$OUT_DIR/bench.json" <<'EOF'
import json, sys
from pathlib import Path
before, after, out = map(Path, sys.argv[1:])
rows = []
for path in sorted(after.glob("*.json")):
    old = json.loads((before / path.name).read_text()) if (before / path.name).exists() else []
    rows += json.loads(path.read_text())[len(old):]
out.write_text(json.dumps(rows, indent=1) + "\n")
print(f"{len(rows)} new benchmark rows -> {out}")
EOF
  note "$(grep -E '(passed|failed|error|skipped)' "$WORK/bench.out" | tail -1); $("$PY" -c "import json; print(len(json.load(open('$OUT_DIR/bench.json'))), 'rows')" 2>/dev/null)"
  return "$rc"
}

# ---------------------------------------------------------------------------------- run
if [ -n "$INTERNAL_STEP" ]; then
  CURRENT="$INTERNAL_STEP"
  "step_$INTERNAL_STEP"
  exit $?
fi
: >"$LOG"
: >"$SUMMARY"
START=$(date +%s)
FAILED=0
{
  echo "sepico_fast gpu_check: $MODE, deadline ${DEADLINE}s, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
  echo "python: $PY; output: $OUT_DIR"
} | tee -a "$SUMMARY" "$LOG"
run_step env 15
start_background_jobs
run_step build "$([ "$DRY" = 1 ] && echo 10 || echo 120)"
run_step gpu_tests "$([ "$DRY" = 1 ] && echo 30 || echo 120)"
run_step no_host_sync "$([ "$DRY" = 1 ] && echo 15 || echo 40)"
run_step step_probe "$([ "$DRY" = 1 ] && echo 60 || echo 120)"
run_step train60 "$([ "$DRY" = 1 ] && echo 60 || echo 90)"
run_step cmake_sanitizer 90
run_step bench "$([ "$DRY" = 1 ] && echo 20 || echo 200)"
echo "total $(elapsed)s; full log: $LOG" | tee -a "$SUMMARY"
# the log must come back (16 MiB per returned file): keep its end when it is larger
if [ "$(wc -c <"$LOG")" -gt 15000000 ]; then tail -c 15000000 "$LOG" >"$WORK/log.tail" && mv "$WORK/log.tail" "$LOG"; fi
for pidfile in "$WORK"/*.pid; do [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null; done
wait 2>/dev/null
rm -rf "$WORK"
exit "$FAILED"
