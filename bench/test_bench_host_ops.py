"""Host side of the paper-size iteration: aten ops per iteration (per phase) and host time.

``bench/host_ops.py`` counts, with the CUDA code path forced on CPU tensors, the non-view
aten ops one iteration dispatches (DAFormer MiT-B5 and DeepLab-v2 R101, batch 2+2,
DistCL + regulariser, jitter and blur on; crop 64 — the count does not depend on the
crop) for the fast step, ``--compile`` (ops left outside the compiled graphs + graph
calls) and the authors' dataflow, plus the host time of one iteration. One fresh process
per row; rows go to ``bench/results/host_ops.json`` with ``--record``. Method and what it
leaves out: bench/NOTES.md, "Host side of one iteration".

    pytest bench/test_bench_host_ops.py -s --record                 # all rows (~30 min on 2 cores)
    pytest bench/test_bench_host_ops.py -s -k "mitb5 and fast"

No count or time is asserted beyond being positive.
"""
from __future__ import annotations

import pytest

from bench.host_ops import cpu_model, subprocess_run
from bench.record import record

ARCHS = ("daformer_mitb5", "dlv2_r101")
MODES = ("fast", "compile", "upstream")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.removeprefix("daformer_"))
def test_bench_host_ops(arch, mode):
    res = subprocess_run(mode, arch, timing=mode != "compile")
    assert res["ops"] > 0 and sum(res["by_phase"].values()) == res["ops"]
    extra = {k: res[k] for k in ("ops", "by_phase", "top_ops", "iteration") if k in res}
    for k in ("graph_calls", "recompiled_in_measured_iteration", "graphs_compiled_in_warmup", "wall_ms",
              "host_times_ms"):
        if k in res:
            extra[k] = res[k]
    extra["cpu_model"] = cpu_model()
    extra["method"] = "cuda path forced on CPU tensors; host_ms = process CPU time, 1 thread"
    host_ms = res.get("host_ms")
    if host_ms is not None:
        assert host_ms > 0
    record("host_ops", mode, "cpu", {"arch": arch, "crop": res["crop"], "batch": res["batch"], "precision": "fp32"},
           host_ms if host_ms is not None else 0.0, extra=extra)
