"""scripts/gpu_check.sh: arguments, the deadline rule, the summary, and results that survive
a step stopped at its limit (no step does real work here).

The whole script runs on the CPU as ``--dry-run`` in .ci/run; these checks cover what that
run cannot show: bad arguments are refused, a step that no longer fits before the deadline
is SKIPPED with its reason instead of being started, and a step killed at its hard limit
still leaves bench.json / train.json (built by the script's own shell) and is PARTIAL
(a benchmark: its finished rows count) or FAIL. A stand-in python that hangs on the
training and on pytest makes the kills certain.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# The summary's order: the headline numbers (kernel rows while the extension builds, the step
# probe eager and with graphs, the bf16 train_step rows, the compiled probe) before the tests.
ORDER = ["env", "bench", "build", "step_probe", "train_step", "probe_compiled", "bench_ops", "triton_tests",
         "ext_tests", "no_host_sync", "cmake_sanitizer", "train60", "probe_more", "train_step_more", "bench_compile"]
HEADLINE = ["bench", "step_probe", "train_step", "probe_compiled"]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run(*args, timeout=120, env=None):
    full_env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_CHECK_STEP_LIMITS")}
    full_env.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def rows_of(out_dir: Path) -> dict:
    summary = (out_dir / "summary.txt").read_text().splitlines()
    assert summary[-1].startswith("total "), summary
    return {line.split()[0]: line for line in summary[2:-1]}


def test_bad_arguments_are_refused_with_one_line():
    for args, env, word in ((["--only", "envv"], None, "unknown step 'envv'"),
                            (["--deadline", "ten"], None, "--deadline must be whole seconds"),
                            (["--frobnicate"], None, "unknown argument '--frobnicate'"),
                            ([], {"GPU_CHECK_STEP_LIMITS": "bench=2s"}, "'bench=2s' is not STEP=SECONDS"),
                            ([], {"GPU_CHECK_STEP_LIMITS": "benchh=2"}, "unknown step 'benchh'")):
        proc = run(*args, env=env)
        assert proc.returncode == 2 and word in proc.stderr and len(proc.stderr.splitlines()) == 1, \
            (args, proc.stderr)


def test_steps_that_do_not_fit_the_deadline_are_skipped_and_said(tmp_path):
    proc = run("--dry-run", "--deadline", "5", "--out", str(tmp_path), env={"GPU_CHECK_COMMIT": "feedbee"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "commit feedbee" in (tmp_path / "summary.txt").read_text().splitlines()[0]
    rows = rows_of(tmp_path)
    assert list(rows) == ORDER
    first_test = min(ORDER.index(t) for t in ("triton_tests", "ext_tests", "no_host_sync", "train60"))
    assert all(ORDER.index(h) < first_test for h in HEADLINE), "headline numbers come before the tests"
    for name, line in rows.items():
        assert " SKIPPED " in line and "left of the 5s deadline" in line, line
    assert (tmp_path / "gpu_check.log").exists()
    # a deadline that lets nothing run leaves no result file behind
    assert not (tmp_path / "train.json").exists() and json.loads((tmp_path / "bench.json").read_text()) == []


def test_only_and_skip_select_steps(tmp_path):
    proc = run("--dry-run", "--deadline", "5", "--only", "env,bench", "--skip", "bench",
               "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = rows_of(tmp_path)
    assert list(rows) == ORDER
    assert "SKIPPED" in rows["env"] and "deadline" in rows["env"]
    assert "SKIPPED     0s  not selected" in rows["build"], "a background step says it too"
    assert "SKIPPED     0s  not selected" in rows["bench"]


@pytest.fixture
def hanging_python(tmp_path):
    """python3, except that the training and pytest hang (until the step's limit kills them)."""
    path = tmp_path / "bin" / "slowpython"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\n"
                    'for a in "$@"; do case "$a" in sepico_fast.train|pytest) sleep 120;; esac; done\n'
                    f'exec "{sys.executable}" "$@"\n')
    path.chmod(0o755)
    return str(path)


def test_a_benchmark_stopped_at_its_limit_is_partial_and_bench_json_is_written(tmp_path, hanging_python):
    out = tmp_path / "out"
    proc = run("--dry-run", "--only", "bench", "--out", str(out),
               env={"PYTHON": hanging_python, "GPU_CHECK_STEP_LIMITS": "bench=2"})
    assert proc.returncode == 0, "PARTIAL is not a failure\n" + proc.stdout + proc.stderr
    line = rows_of(out)["bench"]
    assert " PARTIAL " in line and "stopped at its 2s limit, what it finished is kept" in line, line
    assert json.loads((out / "bench.json").read_text()) == []


def test_a_training_stopped_at_its_limit_fails_and_train_json_says_so(tmp_path, hanging_python):
    out = tmp_path / "out"
    proc = run("--dry-run", "--only", "train60", "--out", str(out),
               env={"PYTHON": hanging_python, "GPU_CHECK_STEP_LIMITS": "train60=2"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = rows_of(out)["train60"]
    assert " FAIL " in line and "stopped after 2s" in line, line
    train = json.loads((out / "train.json").read_text())
    assert train["complete"] is False and train["metrics"] is None and train["exit"] in ("124", "137")


def test_the_headline_fits_the_first_minutes_by_the_scripts_own_estimates():
    """By the script's own GPU estimates (run_step ... "$(est DRY GPU)"), the probe's eager and
    graphs rows, the kernel rows and the bf16 train_step rows are in within ~4 minutes of a
    fresh machine (the build overlaps the kernel rows), the compiled probe within ~5.5."""
    import re
    text = SCRIPT.read_text()
    run = text[text.index("# --- the headline numbers"):text.index("# --- the tests")]
    gpu = {m.group(1): int(m.group(2)) for m in re.finditer(r'run_step (\w+) "\$\(est \d+ (\d+)\)"', run)}
    assert list(gpu) == ["bench", "step_probe", "train_step", "probe_compiled", "bench_ops"], gpu
    assert "run_step build" in run and "bg" in run.split("run_step build")[1].splitlines()[0]
    headline = 15 + max(90, gpu["bench"]) + gpu["step_probe"] + gpu["train_step"]
    assert headline <= 240 and headline + gpu["probe_compiled"] <= 330, headline
