"""pytest bench/ plumbing: nothing tracked is written unless asked, one summary table at the
end, charts from the committed records. Runs a fake benchmark on a copy of bench/'s
record.py and conftest.py (the real benchmarks are too slow for CI)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_BENCH = '''
import torch
from bench.record import median_time_ms, record

def test_fake_op():
    x = torch.ones(1000)
    for impl, scale in (("upstream", 4), ("torch", 1)):
        ms = median_time_ms(lambda i: (x * scale).sum(), "cpu", warmup=1, repeats=3)
        record("fake_op", impl, "cpu", {"N": 1000}, ms * scale, bytes_moved=8000)
'''


def _fake_bench_dir(tmp_path):
    pkg = tmp_path / "bench"
    pkg.mkdir()
    for name in ("__init__.py", "record.py", "conftest.py"):
        shutil.copy(ROOT / "bench" / name, pkg / name)
    (pkg / "test_bench_fake.py").write_text(FAKE_BENCH)
    return pkg


def _pytest(tmp_path, *args, env=None):
    full_env = {k: v for k, v in os.environ.items() if k != "SEPICO_FAST_BENCH_RECORD"}
    full_env.update(PYTHONPATH=str(tmp_path), **(env or {}))
    out = subprocess.run([sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", *args],
                         cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_plain_run_writes_nothing_and_prints_one_summary(tmp_path):
    pkg = _fake_bench_dir(tmp_path)
    out = _pytest(tmp_path)
    assert not (pkg / "results").exists()
    assert out.count("benchmark summary") == 1 and "not recorded (pytest bench/ --record" in out
    table = out[out.index("benchmark summary"):].splitlines()
    head = next(i for i, ln in enumerate(table) if ln.startswith("op "))
    assert table[head].split() == ["op", "impl", "device", "shape", "ms", "GB/s", "%", "roofline", "vs", "upstream"]
    rows = [ln.split() for ln in table[head + 2:head + 4]]
    assert [r[:4] for r in rows] == [["fake_op", "upstream", "cpu", "N=1000"], ["fake_op", "torch", "cpu", "N=1000"]]
    assert rows[0][-1] == "upstream" and rows[1][-1].endswith("x")


def test_record_option_or_env_appends_rows(tmp_path):
    pkg = _fake_bench_dir(tmp_path)
    out = _pytest(tmp_path, "--record")
    rows = json.loads((pkg / "results" / "fake_op.json").read_text())
    assert [r["impl"] for r in rows] == ["upstream", "torch"] and "appended to" in out
    _pytest(tmp_path, env={"SEPICO_FAST_BENCH_RECORD": "1"})  # the variable works too; appends, never rewrites
    assert [r["impl"] for r in json.loads((pkg / "results" / "fake_op.json").read_text())] == ["upstream", "torch"] * 2


def test_summary_table_speedup_matches_rows_by_bench_device_and_shape():
    sys.path.insert(0, str(ROOT))
    from bench.record import speedup_vs_upstream, summary_table

    rows = [dict(bench="op", impl="upstream", device="cpu (x)", shape={"N": 1}, median_ms=10.0),
            dict(bench="op", impl="upstream", device="cpu (x)", shape={"N": 2}, median_ms=50.0),
            dict(bench="op", impl="torch", device="cpu (x)", shape={"N": 2}, median_ms=5.0, gbps=1.5,
                 roofline_pct=12.0),
            dict(bench="op", impl="torch", device="gpu (y)", shape={"N": 2}, median_ms=1.0),
            dict(bench="other", impl="torch", device="cpu (x)", shape={"N": 2}, median_ms=1.0)]
    assert speedup_vs_upstream(rows[2], rows) == 10.0
    assert speedup_vs_upstream(rows[3], rows) is None and speedup_vs_upstream(rows[4], rows) is None
    lines = summary_table(rows).splitlines()
    assert lines[4].split() == ["op", "torch", "cpu", "N=2", "5.000", "1.5", "12.0", "10.00x"]
    assert lines[5].split()[-1] == "n/a" and len(lines) == 7
