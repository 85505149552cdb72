"""The timing helpers of bench/record.py: call counts, input rotation, CUDA-graph timing.

No timing is asserted (speed is shown by bench/, never by tests); only what is called how
often and what each helper reports.
"""
import contextlib

import pytest
import torch

from bench import record
from bench.record import calls_per_event, graph_time_ms, kernel_timings, median_time_ms


def test_back_to_back_calls_rotate_inputs_and_are_counted():
    seen = []
    ms = median_time_ms(seen.append, "cpu", warmup=2, repeats=3, calls=4)
    assert seen == list(range(2 + 3 * 4)), "every call gets the next index"
    assert ms >= 0.0
    with pytest.raises(ValueError, match="calls"):
        median_time_ms(seen.append, "cpu", calls=0)


def test_calls_per_event_spans_the_target():
    assert calls_per_event(0.01, target_ms=2.0) == 200
    assert calls_per_event(0.05, target_ms=2.0) == 40
    assert calls_per_event(5.0, target_ms=2.0) == 1
    assert calls_per_event(0.0) == 200
    assert calls_per_event(0.001, max_calls=50) == 50


def test_kernel_timings_on_cpu_report_every_field():
    seen = []
    out = kernel_timings(seen.append, "cpu", warmup=1, repeats=2)
    assert set(out) == {"single_call_ms", "calls_per_event", "median_ms", "graph_ms", "graph_error"}
    assert out["calls_per_event"] == 1 and out["graph_ms"] is None
    assert out["graph_error"] == "CUDA graphs need a GPU"
    assert out["median_ms"] == pytest.approx(out["single_call_ms"], abs=1e-4)
    assert len(seen) == 3  # no second timing pass when one call per event
    with pytest.raises(RuntimeError, match="CUDA"):
        graph_time_ms(seen.append, "cpu", calls=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_timing_on_cuda_and_capture_failures_are_reported():
    x = torch.randn(1 << 16, device="cuda")
    buf = torch.empty_like(x)
    out = kernel_timings(lambda i: torch.add(x, i, out=buf), "cuda", warmup=2, repeats=3)
    assert out["graph_ms"] is not None and out["graph_error"] is None, out
    assert out["calls_per_event"] >= 1
    synced = kernel_timings(lambda i: x[x > 0].sum().item(), "cuda", warmup=1, repeats=2)
    assert synced["graph_ms"] is None and synced["graph_error"], synced
    assert torch.cuda.current_stream() == torch.cuda.default_stream(), "failed capture left its stream current"
    named = kernel_timings(lambda i: x.sum(), "cuda", warmup=1, repeats=2, graph="host syncs")
    assert named["graph_error"] == "host syncs"


class _Stream:
    def __init__(self, name):
        self.name = name

    def wait_stream(self, other):
        pass


def test_failed_capture_restores_the_current_stream(monkeypatch):
    """torch.cuda.graph's __exit__ calls capture_end() first and restores the stream after it,
    so a capture invalidated by a host sync leaves the capture stream current (seen in
    torch's source); graph_time_ms must put the caller's stream back. CUDA faked on the CPU."""
    state = {"current": _Stream("default")}

    @contextlib.contextmanager
    def stream(s):  # torch.cuda.stream: a proper context manager
        before, state["current"] = state["current"], s
        try:
            yield
        finally:
            state["current"] = before

    class FailingGraph:  # torch.cuda.graph whose capture_end raises
        def __init__(self, graph):
            pass

        def __enter__(self):
            state["current"] = _Stream("capture")

        def __exit__(self, *exc):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["current"])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: state.__setitem__("current", s))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream("side"))
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "graph", FailingGraph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    calls = []
    with pytest.raises(RuntimeError, match="capturing"):
        graph_time_ms(calls.append, "cuda", calls=2, warmup=1)
    assert state["current"].name == "default"
    assert calls == [0, 1, 2], "warm-up on the side stream, then the captured calls"


def test_commit_and_results_folder_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GPU_CHECK_COMMIT", "abc1234")
    assert record.git_commit() == "abc1234"
    monkeypatch.setenv("GPU_CHECK_COMMIT", "  ")
    assert record.git_commit() != "  "  # blank: git, or "unknown"
    monkeypatch.setenv("SEPICO_FAST_BENCH_RESULTS_DIR", str(tmp_path / "rows"))
    assert record.results_folder() == tmp_path / "rows"
    path = record.append_row({"bench": "fake", "impl": "torch"})
    assert path == tmp_path / "rows" / "fake.json"
    monkeypatch.delenv("SEPICO_FAST_BENCH_RESULTS_DIR")
    assert record.results_folder() == record.RESULTS_DIR
