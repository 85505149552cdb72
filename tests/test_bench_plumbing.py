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


def test_plot_charts_latest_rows_per_device(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.plot import chart_data, main

    results = tmp_path / "results"
    results.mkdir()
    row = dict(bench="dist", device="cpu (x86_64, 2 cores)", shape={"N": 8, "dtype": "float32"})
    rows = [dict(row, impl="upstream", median_ms=40.0), dict(row, impl="torch", median_ms=30.0),
            dict(row, impl="torch", median_ms=10.0),  # a newer record of the same row replaces the older
            dict(row, impl="torch_compile", median_ms=20.0),
            dict(row, impl="triton", device="NVIDIA H100 80GB HBM3", median_ms=0.1)]
    (results / "dist.json").write_text(json.dumps(rows))
    (results / "ref.json").write_text(json.dumps([dict(bench="ref", impl="reference", device="cpu (x)",
                                                       shape={"op": "stats", "N": 8}, median_ms=2.0)]))
    data = chart_data(json.loads((results / "dist.json").read_text()) + json.loads((results / "ref.json").read_text()))
    assert sorted(data) == ["cpu", "nvidia_h100_80gb_hbm3"] and sorted(data["cpu"]) == ["dist", "ref / stats"]
    bars = {b["impl"]: b for b in data["cpu"]["dist"]}
    assert bars["torch"]["ms"] == 10.0 and bars["torch"]["speedup"] == 4.0 and bars["torch_compile"]["speedup"] == 2.0
    assert [bars[k]["family"] for k in ("torch", "torch_compile", "upstream")] == ["sepico_fast", "torch.compile",
                                                                                  "upstream"]
    assert bars["torch"]["label"] == "torch  N=8"
    written = main(["--results", str(results), "--out", str(tmp_path / "img")])
    assert [p.name for p in written] == ["bench_cpu.png", "bench_nvidia_h100_80gb_hbm3.png"]
    from PIL import Image

    assert all(Image.open(p).size[0] > 500 for p in written)


def test_cpu_rows_name_the_cpu_model(tmp_path, monkeypatch):
    """A CPU row's device names the model ("model name" of /proc/cpuinfo), not only x86_64;
    without cpuinfo it falls back to platform.processor(), then platform.machine()."""
    sys.path.insert(0, str(ROOT))
    from bench import record

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: Example\nmodel name\t: Example  CPU 9000 @ 3.0GHz\n"
                    "processor\t: 1\nmodel name\t: Example  CPU 9000 @ 3.0GHz\n")
    assert record.cpu_model(info) == "Example CPU 9000 @ 3.0GHz"
    missing = tmp_path / "absent"
    monkeypatch.setattr(record.platform, "processor", lambda: "Example processor")
    assert record.cpu_model(missing) == "Example processor"
    monkeypatch.setattr(record.platform, "processor", lambda: "")
    monkeypatch.setattr(record.platform, "machine", lambda: "riscv64")
    assert record.cpu_model(missing) == "riscv64"

    monkeypatch.setattr(record, "cpu_model", lambda: "Example CPU 9000")
    monkeypatch.setattr(record.platform, "machine", lambda: "x86_64")
    name = record.device_name("cpu")
    assert name.startswith("cpu (Example CPU 9000, x86_64, ") and f"{os.cpu_count()} cores" in name
    monkeypatch.setattr(record, "cpu_model", lambda: "x86_64")  # nothing better known: not repeated
    assert record.device_name("cpu").startswith("cpu (x86_64, ")
