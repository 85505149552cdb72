"""scripts/gpu_check.sh: arguments, the deadline rule and the summary (no step is run here).

The whole script runs on the CPU as ``--dry-run`` in .ci/run; these checks only cover what
that run cannot show: bad arguments are refused, and a step that no longer fits before the
deadline is SKIPPED with its reason instead of being started.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run(*args, timeout=120):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_bad_arguments_are_refused_with_one_line():
    for args, word in ((["--only", "envv"], "unknown step 'envv'"),
                       (["--deadline", "ten"], "--deadline must be whole seconds"),
                       (["--frobnicate"], "unknown argument '--frobnicate'")):
        proc = run(*args)
        assert proc.returncode == 2 and word in proc.stderr, (args, proc.stderr)


def test_steps_that_do_not_fit_the_deadline_are_skipped_and_said(tmp_path):
    proc = run("--dry-run", "--deadline", "5", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    rows = {line.split()[0]: line for line in summary[2:-1]}
    assert list(rows) == ["env", "build", "gpu_tests", "no_host_sync", "step_probe", "train60",
                          "cmake_sanitizer", "bench"]
    for name, line in rows.items():
        assert " SKIPPED " in line and "left of the 5s deadline" in line, line
    assert summary[-1].startswith("total ")
    assert (tmp_path / "gpu_check.log").exists()


def test_only_and_skip_select_steps(tmp_path):
    proc = run("--dry-run", "--deadline", "5", "--only", "env,bench", "--skip", "bench",
               "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (tmp_path / "summary.txt").read_text()
    assert "env              SKIPPED" in text and "deadline" in text.split("env", 1)[1].splitlines()[0]
    assert "build            SKIPPED     0s  not selected" in text
    assert "bench            SKIPPED     0s  not selected" in text
