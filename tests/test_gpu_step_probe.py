"""scripts/gpu_step_probe.py keeps what it measured when it is stopped mid-way.

On the GPU machine the probe runs under a time limit (scripts/gpu_check.sh): each variant
must be in ``--out`` as soon as its table line is printed, so a stop during the next
variant loses only that one. The measuring itself is run for real (tiny, on the CPU) by
the dry run of scripts/gpu_check.sh in .ci/run; here the variants are stand-ins.
"""
import dataclasses
import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("gpu_step_probe", ROOT / "scripts" / "gpu_step_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_result(ms: float) -> dict:
    return {"config": {"variant": "dist", "amp": "bf16"}, "ms_per_iter_median": ms, "ms_per_iter_back_to_back": ms,
            "images_per_s": 4000 / ms, "host_syncs_per_step": 0.0, "peak_mem_gb": 1.5, "mfu_counted": None,
            "mfu_documented": 0.25, "phases": [{"phase": "teacher", "calls": 1, "ms_per_step": ms, "share": 1.0}]}


def test_each_variant_is_written_before_the_next_one_starts(probe, monkeypatch, tmp_path, capsys):
    out = tmp_path / "probe.json"
    seen = []

    def probe_variant(args, name, spec, device, models, records):
        seen.append(name)
        if name == "bf16_proto":  # the time limit strikes during the second variant
            assert json.loads(out.read_text())["variants"]["bf16_dist"]["ms_per_iter_median"] == 250.0
            raise KeyboardInterrupt
        return _fake_result(250.0)

    monkeypatch.setattr(probe, "probe_variant", probe_variant)
    with pytest.raises(KeyboardInterrupt):
        probe.main(["--tiny", "--variants", "bf16_dist,bf16_proto,bf16_bank_full", "--out", str(out)])
    assert seen == ["bf16_dist", "bf16_proto"]
    written = json.loads(out.read_text())
    assert list(written["variants"]) == ["bf16_dist"] and written["device"] == "cpu"
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant "))
    first = next(i for i, line in enumerate(lines) if line.startswith("bf16_dist "))
    assert header < first and "16.0" in lines[first] and "25.0%" in lines[first]  # img/s, MFU
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failing_variant_is_recorded_and_the_others_still_run(probe, monkeypatch, tmp_path):
    out = tmp_path / "probe.json"

    def probe_variant(args, name, spec, device, models, records):
        if name == "fp16_dist_scaler":
            raise RuntimeError("no fp16 here")
        return _fake_result(100.0)

    monkeypatch.setattr(probe, "probe_variant", probe_variant)
    rc = probe.main(["--tiny", "--variants", "fp16_dist_scaler,bf16_proto", "--out", str(out)])
    written = json.loads(out.read_text())["variants"]
    assert rc == 1 and written["fp16_dist_scaler"]["error"] == "RuntimeError: no fp16 here"
    assert written["bf16_proto"]["ms_per_iter_median"] == 100.0


def test_phase_table_times_each_phase_of_the_step(probe, monkeypatch):
    calls = []

    def train_step(ctx, src, tgt, it):
        calls.append(it)
        for name, repeat in (("teacher", 1), ("mix", 2)):
            for _ in range(repeat):
                with ctx.profiler.phase(name):
                    sum(range(20000))

    monkeypatch.setattr(probe, "train_step", train_step)
    before = object()
    ctx = types.SimpleNamespace(profiler=before)
    rows = probe.phase_table(ctx, None, None, 7, 2, torch.device("cpu"))
    assert calls == [7, 8] and ctx.profiler is before, "the step's own profiler is put back"
    by_name = {r["phase"]: r for r in rows}
    assert set(by_name) == {"teacher", "mix"}
    assert by_name["teacher"]["calls"] == 2 and by_name["mix"]["calls"] == 4
    assert sum(r["share"] for r in rows) == pytest.approx(1.0, abs=2e-3)
    assert [r["ms_per_step"] for r in rows] == sorted((r["ms_per_step"] for r in rows), reverse=True)
    assert probe.phase_table(ctx, None, None, 0, 0, torch.device("cpu")) == []


def test_headline_variants_come_first_and_graphs_not_in_this_build_is_no_failure(probe, monkeypatch, tmp_path, capsys):
    assert list(probe.VARIANTS)[:3] == ["bf16_dist", "bf16_dist_graphs", "bf16_dist_compiled"]
    monkeypatch.setattr(probe, "has_cuda_graphs_flag", lambda: False)
    out = tmp_path / "probe.json"
    rc = probe.main(["--tiny", "--variants", "bf16_dist_graphs", "--out", str(out)])
    written = json.loads(out.read_text())["variants"]["bf16_dist_graphs"]
    assert rc == 0 and written["skipped"].startswith("not available in this build") and "error" not in written
    assert any(line.startswith("bf16_dist_graphs") and "not available in this build" in line
               for line in capsys.readouterr().out.splitlines())


def test_graphs_variant_sets_the_trainer_switch_when_it_exists(probe, monkeypatch):
    from sepico_fast.train.config import TrainConfig
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert probe.has_cuda_graphs_flag() == ("cuda_graphs" in fields)
    seen = {}

    def make_config(overrides):
        seen.update(overrides)
        raise RuntimeError("stop here")

    monkeypatch.setattr(probe, "has_cuda_graphs_flag", lambda: True)
    monkeypatch.setattr(probe, "make_config", make_config)
    args = probe.parse_args(["--tiny"])
    with pytest.raises(RuntimeError, match="stop here"):
        probe.probe_variant(args, "bf16_dist_graphs", probe.VARIANTS["bf16_dist_graphs"], torch.device("cpu"), {},
                            probe._Records())
    assert seen["cuda_graphs"] is True and "compile" not in seen
    seen.clear()
    with pytest.raises(RuntimeError, match="stop here"):
        probe.probe_variant(args, "bf16_dist_compiled", probe.VARIANTS["bf16_dist_compiled"], torch.device("cpu"),
                            {}, probe._Records())
    assert seen["compile"] is True and "cuda_graphs" not in seen


def test_gpu_busy_is_the_union_of_device_intervals_and_merge_keeps_earlier_variants(probe, monkeypatch, tmp_path):
    # overlapping kernels on two streams count once; a gap does not count
    assert probe._union_ms([(0.0, 1000.0), (500.0, 1500.0), (3000.0, 3500.0), (3100.0, 3200.0)]) == 2.0
    assert probe._union_ms([]) == 0.0
    assert probe.gpu_busy(None, None, None, 0, 3, torch.device("cpu")) == (None, "not measured: needs a GPU")
    monkeypatch.setattr(probe, "probe_variant", lambda args, name, *a: _fake_result(100.0 if name == "bf16_dist" else 50.0))
    out = tmp_path / "probe.json"
    probe.main(["--tiny", "--variants", "bf16_dist", "--out", str(out)])
    probe.main(["--tiny", "--variants", "bf16_proto", "--merge", "--out", str(out)])
    assert list(json.loads(out.read_text())["variants"]) == ["bf16_dist", "bf16_proto"]
    probe.main(["--tiny", "--variants", "bf16_proto", "--out", str(out)])  # without --merge: a new file
    assert list(json.loads(out.read_text())["variants"]) == ["bf16_proto"]


def test_device_intervals_keep_only_cuda_events(probe):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    def evt(kind, a, b):
        return types.SimpleNamespace(device_type=kind, time_range=types.SimpleNamespace(start=a, end=b))

    events = [evt(DeviceType.CPU, 0, 50), evt(DeviceType.CUDA, 10, 20), evt(DeviceType.CUDA, 30, 30)]
    assert probe.device_intervals(events) == [(10, 20)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # real events: the attributes exist
        torch.ones(8, 8) @ torch.ones(8, 8)
    assert len(prof.events()) > 0 and probe.device_intervals(prof.events()) == []
