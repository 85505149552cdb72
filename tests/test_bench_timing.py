"""The timing helpers of bench/record.py: call counts, input rotation, CUDA-graph timing.

No timing is asserted (speed is shown by bench/, never by tests); only what is called how
often and what each helper reports.
"""
import pytest
import torch

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
    named = kernel_timings(lambda i: x.sum(), "cuda", warmup=1, repeats=2, graph="host syncs")
    assert named["graph_error"] == "host syncs"
