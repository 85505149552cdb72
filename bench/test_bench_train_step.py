"""One whole SePiCo iteration: ``train_step`` (fast) vs the authors' dataflow, side by side.

The baseline is ``bench/upstream_step.py`` (same networks and mathematics, the authors'
passes, loops, dense statistics, per-parameter AdamW, fp32 eager), and next to it the same
dataflow with TF32 matmuls/convolutions and the foreach AdamW (``upstream_tf32_foreach``:
what two switches of current PyTorch give it; its peak memory is not measured separately). Each row runs
``bench/step_harness.py`` in fresh processes: one times both dataflows interleaved (median
of 5 iterations after 2 warm-up ones, jitter and blur on, DistCL + regulariser, target
images crop × 2·crop), then one process per dataflow measures its peak memory (CPU: peak
RSS of the process; CUDA: ``max_memory_allocated``). Results are appended to
``bench/results/train_step_vs_upstream.json`` (and ``train_step_scaling.json``), one
record per dataflow with ``speedup_vs_upstream`` on the fast one.

    # quick subset (MiT-B0, crop 256, batch 1+1, eager; ~3 min on a quiet 2-core AMD EPYC CPU)
    pytest bench/test_bench_train_step.py -s -k "cpu and mitb0-256-b1 and eager"
    # the full CPU table + scaling table (see bench/NOTES.md for the measured duration)
    pytest bench/test_bench_train_step.py -s -k "cpu or scaling"
    # GPU rows (skipped without CUDA)
    pytest bench/test_bench_train_step.py -s -k cuda

No timing is asserted: only that every number came back finite and positive.
"""
from __future__ import annotations

import math

import pytest
import torch

from bench.record import record
from bench.step_harness import subprocess_run

CPU_ROWS = [(arch, crop, batch) for arch in ("daformer_mitb0", "dlv2_r50")
            for crop, batch in ((256, 1), (256, 2), (512, 1))]
CUDA_ROWS = [("daformer_mitb5", 640, 2), ("dlv2_r101", 640, 2)]
SCALING_CROPS = (256, 384, 512)
_MEASURED: dict[tuple, dict] = {}  # rows already measured in this session (reused by the scaling table)


def _row_id(row) -> str:
    arch, crop, batch = row
    return f"{arch.removeprefix('daformer_')}-{crop}-b{batch}"


def _measure(device: str, arch: str, crop: int, batch: int, precision: str, mode: str) -> dict:
    key = (device, arch, crop, batch, precision, mode)
    if key in _MEASURED:
        return _MEASURED[key]
    kw = dict(device=device, precision=precision, compile_models=mode == "compile")
    timing = subprocess_run(arch, crop, batch, dataflow="both", **kw)
    for name in ("fast", "upstream"):
        mem = subprocess_run(arch, crop, batch, dataflow=name, warmup=1, repeats=1, memory=True, **kw)
        timing[name]["peak_mem_mb"] = mem["peak_mem_mb"]
        timing[name]["rss_setup_mb"] = mem.get("rss_setup_mb")
    _MEASURED[key] = timing
    return timing


def _record(bench: str, device: str, result: dict, mode: str) -> None:
    shape = {k: result[k] for k in ("arch", "crop", "batch", "precision")}
    shape["mode"] = mode
    images = 2 * result["batch"]  # source + target images per iteration
    up, fast = result["upstream"], result["fast"]
    tf32 = result.get("upstream_tf32_foreach")
    for name, res in (("upstream", up), ("fast", fast)):
        ms = res["median_ms"]
        assert ms is not None and math.isfinite(ms) and ms > 0, (name, res)
        assert res["peak_mem_mb"] is not None and res["peak_mem_mb"] > 0, (name, res)
        extra = {"images_per_s": round(images / (ms * 1e-3), 3), "times_ms": res["times_ms"],
                 "warmup_ms": res["warmup_ms"], "cpu_median_ms": round(res["cpu_median_ms"], 1),
                 "rss_setup_mb": res.get("rss_setup_mb"),
                 "threads": result["threads"],
                 "interleaved_with": ", ".join(n for n in ("fast", "upstream", "upstream_tf32_foreach")
                                               if n != name and n in result)}
        if name == "fast":
            extra["speedup_vs_upstream"] = round(up["median_ms"] / ms, 3)
            if tf32 is not None:
                extra["speedup_vs_upstream_tf32_foreach"] = round(tf32["median_ms"] / ms, 3)
            extra["peak_mem_vs_upstream"] = round(res["peak_mem_mb"] / up["peak_mem_mb"], 3)
        record(bench, name if name == "upstream" else f"fast_{mode}", device, shape, ms,
               peak_mem_mb=res["peak_mem_mb"], extra=extra)
    if tf32 is not None:
        ms = tf32["median_ms"]
        assert ms is not None and math.isfinite(ms) and ms > 0, tf32
        record(bench, "upstream_tf32_foreach", device, shape, ms,
               extra={"images_per_s": round(images / (ms * 1e-3), 3), "times_ms": tf32["times_ms"],
                      "warmup_ms": tf32["warmup_ms"], "cpu_median_ms": round(tf32["cpu_median_ms"], 1),
                      "threads": result["threads"], "interleaved_with": "fast, upstream",
                      "baseline": "upstream dataflow with TF32 matmuls/convolutions and foreach AdamW",
                      "peak_mem_mb_note": "not measured (the upstream row's plus foreach's temporaries)"})
    print(f"[train_step] {shape}: upstream {up['median_ms']:.0f} ms"
          + (f", upstream TF32+foreach {tf32['median_ms']:.0f} ms" if tf32 is not None else "")
          + f", fast {fast['median_ms']:.0f} ms "
          f"({up['median_ms'] / fast['median_ms']:.2f}x); peak memory {up['peak_mem_mb']:.0f} -> "
          f"{fast['peak_mem_mb']:.0f} MB; fast warm-up {fast['warmup_ms']} ms")


@pytest.mark.parametrize("mode", ["eager", "compile"])
@pytest.mark.parametrize("row", CPU_ROWS, ids=_row_id)
def test_bench_train_step_cpu(row, mode):
    arch, crop, batch = row
    _record("train_step_vs_upstream", "cpu", _measure("cpu", arch, crop, batch, "fp32", mode), mode)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU rows not measured")
@pytest.mark.parametrize("mode", ["eager", "compile"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])  # bf16 first: the GPU check's headline row
@pytest.mark.parametrize("row", CUDA_ROWS, ids=_row_id)
def test_bench_train_step_cuda(row, precision, mode):
    arch, crop, batch = row
    _record("train_step_vs_upstream", "cuda", _measure("cuda", arch, crop, batch, precision, mode), mode)


@pytest.mark.parametrize("crop", SCALING_CROPS)
@pytest.mark.parametrize("arch", ["daformer_mitb0", "dlv2_r50"])
def test_bench_train_step_scaling(arch, crop):
    """ms/iter of both dataflows vs crop (b1+1, fp32 eager, CPU): how each grows with the pixels."""
    _record("train_step_scaling", "cpu", _measure("cpu", arch, crop, 1, "fp32", "eager"), "eager")
