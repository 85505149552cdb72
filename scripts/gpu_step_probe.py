"""Paper-size probe of one training step on a GPU: what runs, how fast, how much memory.

    python scripts/gpu_step_probe.py --out probe.json              # GPU: DAFormer MiT-B5
    python scripts/gpu_step_probe.py --tiny --out probe.json       # CPU smoke run (CI dry run)
    python scripts/gpu_step_probe.py --variants bf16_proto --merge --out probe.json   # add to a file

Default size (method §6, §8): DAFormer MiT-B5 (random init: no download), source crop
640×640, target image 640×1280 (the class-balanced crop is searched in it), batch 2+2,
19 classes, projection dim 512, contrast on from the first step. Variants (the first three,
the headline of the GPU check, are the same step run three ways):

    bf16_dist            bf16 autocast, DistCL, eager       (the default --amp path)
    bf16_dist_graphs     the same with the trainer's --cuda-graphs (cfg.cuda_graphs=True);
                         "not available in this build" when TrainConfig has no such field
    bf16_dist_compiled   the same with the trainer's --compile (runner.compile_step)
    fp16_dist_scaler     fp16 autocast + GradScaler, DistCL (pre-Ampere --amp path)
    bf16_bank_full       bf16, BankCL with every class bank full (M = 200)
    bf16_proto           bf16, ProtoCL

The graphs and compiled variants work on copies of the networks, so the other variants
stay eager whatever order they run in.

Per variant: the implementation each contrast op and pixel op took (from the one-time
log records of the dispatchers), host synchronisations per step (CUDA sync debug mode
"warn", counted), ms per iteration (median of synchronised steps, and the mean of
back-to-back steps), images per second (source + target), peak memory, a per-phase
table (``train_step``'s phases, each synchronised at its boundaries: their sum is above
the back-to-back time), and MFU from the FLOPs that ``FlopCounterMode`` counts in one
step (matmuls/convolutions; the Triton kernels' few GFLOPs are not counted) and from the
trainer's documented count. GPU-busy time: the union of the intervals in which a CUDA
kernel, copy or memset ran (torch.profiler, ``--busy-steps`` back-to-back steps) per step,
next to the back-to-back wall time: ``wall_over_busy`` near 1 means the GPU never waits
for the host (a host-bound step shows its launch gaps here).

``--out`` is rewritten after every variant and one table line is printed as each one
ends, so a probe stopped by a time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
import traceback
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sepico_fast.contrast import ClassStats  # noqa: E402
from sepico_fast.device import resolve_device  # noqa: E402
from sepico_fast.models import build_segmentor  # noqa: E402
from sepico_fast.train import runner  # noqa: E402
from sepico_fast.train.config import TrainConfig, make_config  # noqa: E402
from sepico_fast.train.implementations import implementation_lines  # noqa: E402
from sepico_fast.train.runner import build_optimizer  # noqa: E402
from sepico_fast.train.step import StepContext, train_step  # noqa: E402
from sepico_fast.train.uda import make_teacher  # noqa: E402

VARIANTS = {
    "bf16_dist": dict(variant="dist", amp="bf16"),
    "bf16_dist_graphs": dict(variant="dist", amp="bf16", mode="graphs"),
    "bf16_dist_compiled": dict(variant="dist", amp="bf16", mode="compiled"),
    "fp16_dist_scaler": dict(variant="dist", amp="fp16"),
    "bf16_bank_full": dict(variant="bank", amp="bf16"),
    "bf16_proto": dict(variant="proto", amp="bf16"),
}
IGNORE = 255
NOT_IN_BUILD = "not available in this build"


def has_cuda_graphs_flag() -> bool:
    """Whether this checkout's trainer has the ``--cuda-graphs`` switch (``TrainConfig.cuda_graphs``)."""
    return any(f.name == "cuda_graphs" for f in dataclasses.fields(TrainConfig))


class _Records(logging.Handler):
    """Collects the dispatchers' one-time records (which implementation, fallbacks)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def _reset_dispatch_logs() -> None:
    """Forget what was logged so that every variant reports its own choices."""
    from sepico_fast import dispatch
    dispatch._logged.clear()
    dispatch._warned.clear()


def blocky_labels(batch, h, w, block, gen):
    coarse = torch.randint(0, 19, (batch, 1, -(-h // block), -(-w // block)), generator=gen)
    coarse[torch.rand(coarse.shape, generator=gen) < 0.05] = IGNORE
    return coarse.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :h, :w].contiguous()


def make_batches(args, device, gen):
    b, (ch, cw), (th, tw) = args.batch, args.crop, args.target
    src = {"img": torch.randn(b, 3, ch, cw, generator=gen).to(device),
           "gt": blocky_labels(b, ch, cw, 32 if ch >= 256 else 8, gen).to(device)}
    tgt = {"img": torch.randn(b, 3, th, tw, generator=gen).to(device)}
    return src, tgt


def build_context(args, name, spec, device, models):
    mode = spec.get("mode", "eager")
    overrides = dict(arch=args.arch, variant=spec["variant"], crop=list(args.crop), iters=40000,
                     batch_size=args.batch, contrast_start=0, warmup_iters=0, proj_dim=args.proj_dim,
                     memory_length=args.memory, amp=True, num_workers=0, seed=0,
                     pretrained="", debug_interval=0)
    if mode == "graphs":
        overrides["cuda_graphs"] = True  # only reached when the field exists (see probe_variant)
    if mode == "compiled":
        overrides["compile"] = True
    cfg = make_config(overrides)
    if models.get("student") is None:
        torch.manual_seed(0)
        models["student"] = build_segmentor(args.arch, cfg.num_classes, cfg.proj_dim,
                                            drop_path_rate=cfg.drop_path_rate).to(device)
        models["teacher"] = make_teacher(models["student"])
    student, teacher = models["student"], models["teacher"]
    if mode != "eager":  # compiling / capturing changes the modules: the other variants keep theirs
        student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    amp_dtype = scaler = None
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if spec["amp"] == "bf16" else torch.float16
        if spec["amp"] == "fp16":
            scaler = torch.amp.GradScaler("cuda")
    stats = ClassStats(cfg.num_classes, cfg.proj_dim, cfg.memory_length if cfg.variant == "bank" else 0,
                       device=device)
    gen = torch.Generator().manual_seed(1)
    # statistics of a run in progress: unit-norm means, small variances, full banks
    stats.mean.copy_(F.normalize(torch.randn(stats.mean.shape, generator=gen), dim=1).to(device))
    stats.var.copy_((1e-3 * torch.rand(stats.var.shape, generator=gen)).to(device))
    stats.count.fill_(1000.0)
    if cfg.variant == "bank":
        stats.bank.copy_(F.normalize(torch.randn(stats.bank.shape, generator=gen), dim=2).to(device))
        stats.bank_len.fill_(cfg.memory_length)
    ctx = StepContext(cfg=cfg, student=student, teacher=teacher,
                      optimizer=build_optimizer(cfg, student, device), stats=stats, device=device,
                      amp_dtype=amp_dtype, scaler=scaler)
    if mode == "compiled":
        runner.compile_step(ctx, backend=args.compile_backend)  # what the trainer's --compile does
    if mode == "graphs":
        from sepico_fast.train import graphs
        ctx.probe_step = graphs.make_step(ctx)  # what the trainer's --cuda-graphs runs
    return cfg, ctx


def run_step(ctx, src, tgt, it):
    """One iteration as the trainer runs it: ``train_step``, or with ``--cuda-graphs`` the
    trainer's ``GraphStep`` (eager warm-up, one capture, then replays)."""
    step = getattr(ctx, "probe_step", None) or train_step
    return step(ctx, src, tgt, it)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Stands in for the trainer's Profiler (``train_step`` only calls ``.phase(name)``):
    times each phase between two device synchronisations."""

    def __init__(self, device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def phase(self, name: str):
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1

    def rows(self, steps: int) -> list[dict]:
        total = sum(self.seconds.values()) or 1.0
        return [{"phase": name, "calls": self.calls[name], "ms_per_step": round(1e3 * secs / steps, 2),
                 "share": round(secs / total, 3)}
                for name, secs in sorted(self.seconds.items(), key=lambda kv: -kv[1])]


def phase_table(ctx, src, tgt, it0, steps, device) -> list[dict]:
    if steps < 1:
        return []
    timer, before = PhaseTimer(device), ctx.profiler
    ctx.profiler = timer
    try:
        for k in range(steps):
            run_step(ctx, src, tgt, it0 + k)
    finally:
        ctx.profiler = before
    return timer.rows(steps)


def count_flops(ctx, src, tgt, it) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            run_step(ctx, src, tgt, it)
        return float(counter.get_total_flops())
    except Exception as exc:  # noqa: BLE001 - a probe reports, it does not stop
        print(f"  FlopCounterMode failed: {type(exc).__name__}: {exc}")
        return None


def documented_flops(cfg, target_hw, it: int) -> float | None:
    try:
        from sepico_fast.train.throughput import flops_per_iteration
        flops = flops_per_iteration(cfg, target_hw)
        return None if flops is None else flops.at(it)  # the probed steps run after contrast start
    except Exception as exc:  # noqa: BLE001 - its signature may change with the trainer
        print(f"  flops_per_iteration failed: {type(exc).__name__}: {exc}")
        return None


def peak_tflops(device) -> float | None:
    try:
        from sepico_fast.train.throughput import device_peak_tflops
        return device_peak_tflops(device)
    except Exception:  # noqa: BLE001
        return None


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals (µs in, ms out)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3


def device_intervals(events) -> list[tuple[float, float]]:
    """(start, end) in µs of the profiler events that ran on a CUDA device (kernels, copies, memsets)."""
    return [(evt.time_range.start, evt.time_range.end) for evt in events
            if str(getattr(evt, "device_type", "")).endswith("CUDA") and evt.time_range.end > evt.time_range.start]


def gpu_busy(ctx, src, tgt, it0, steps, device) -> tuple[float | None, str]:
    """(GPU-busy ms per step, how): the union of the device intervals of kernels, copies and
    memsets that torch.profiler (CUPTI) records while ``steps`` steps run back to back."""
    if device.type != "cuda" or steps < 1:
        return None, "not measured: needs a GPU"
    from torch.profiler import ProfilerActivity, profile
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for k in range(steps):
            run_step(ctx, src, tgt, it0 + k)
        _sync(device)
    intervals = device_intervals(prof.events())
    if not intervals:
        return None, "not measured: the profiler recorded no device activity"
    return _union_ms(intervals) / steps, f"torch.profiler device intervals, union over {steps} steps"


def host_syncs(ctx, src, tgt, it0, steps, device) -> tuple[float | None, list[str]]:
    """Synchronisations per step under torch.cuda.set_sync_debug_mode("warn"), and where."""
    if device.type != "cuda" or steps < 1:
        return None, ["not measured: CUDA sync debug mode needs a GPU"]
    _sync(device)
    sites: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for k in range(steps):
                run_step(ctx, src, tgt, it0 + k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    for w in syncs:
        key = f"{Path(w.filename).name}:{w.lineno}: {str(w.message)[:80]}"
        sites[key] = sites.get(key, 0) + 1
    return len(syncs) / steps, [f"{n}x {k}" for k, n in sorted(sites.items(), key=lambda kv: -kv[1])][:10]


def probe_variant(args, name, spec, device, models, records) -> dict:
    if spec.get("mode") == "graphs" and not has_cuda_graphs_flag():
        return {"config": {"variant": spec["variant"], "amp": spec["amp"], "mode": "graphs"},
                "skipped": f"{NOT_IN_BUILD}: TrainConfig has no cuda_graphs field (--cuda-graphs)"}
    _reset_dispatch_logs()
    records.lines.clear()
    cfg, ctx = build_context(args, name, spec, device, models)
    gen = torch.Generator().manual_seed(2)
    src, tgt = make_batches(args, device, gen)
    it, warmup = 1, args.warmup
    if spec.get("mode") == "graphs":  # from the first graph-ready iteration: 3 eager, 1 capture
        from sepico_fast.train.graphs import static_from
        it, warmup = static_from(cfg), max(args.warmup, 4)
    t0 = time.perf_counter()
    for _ in range(warmup):  # compiles Triton kernels, cuDNN/cuBLAS heuristics
        run_step(ctx, src, tgt, it)
        it += 1
    _sync(device)
    warmup_s = time.perf_counter() - t0
    syncs, sites = host_syncs(ctx, src, tgt, it, args.sync_steps, device)
    it += args.sync_steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):  # synchronised steps
        _sync(device)
        t = time.perf_counter()
        run_step(ctx, src, tgt, it)
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
        it += 1
    t = time.perf_counter()
    for _ in range(args.steps):  # back to back: the host may run ahead (no syncs in a step)
        run_step(ctx, src, tgt, it)
        it += 1
    _sync(device)
    back_to_back_ms = (time.perf_counter() - t) * 1e3 / args.steps
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    busy_ms, busy_how = gpu_busy(ctx, src, tgt, it, args.busy_steps, device)
    it += args.busy_steps
    phases = phase_table(ctx, src, tgt, it, args.phase_steps, device)
    it += args.phase_steps
    mode = spec.get("mode", "eager")
    if mode == "eager":
        counted = count_flops(ctx, src, tgt, it) if args.flops else None
        models.setdefault("flops_counted", counted)
    else:  # the same step's FLOPs; counting under a dispatch mode could recompile or break a graph
        counted = models.get("flops_counted")
    documented = documented_flops(cfg, tuple(tgt["img"].shape[-2:]), it)
    peak = peak_tflops(device)
    ms = statistics.median(times)

    def mfu(flops):
        return round(flops / (ms * 1e-3) / (peak * 1e12), 4) if flops and peak else None

    skipped = float(ctx.skipped.item())
    return {
        "config": {"arch": cfg.arch, "variant": cfg.variant, "amp": spec["amp"], "mode": spec.get("mode", "eager"),
                   "batch": args.batch,
                   "crop": list(args.crop), "target": list(args.target), "proj_dim": cfg.proj_dim,
                   "memory_length": cfg.memory_length if cfg.variant == "bank" else 0},
        "dispatch_log": list(records.lines),
        "ms_per_iter_median": round(ms, 2),
        "ms_per_iter_all": [round(x, 2) for x in times],
        "ms_per_iter_back_to_back": round(back_to_back_ms, 2),
        "gpu_busy_ms_per_iter": round(busy_ms, 2) if busy_ms is not None else None,
        "wall_over_busy": round(back_to_back_ms / busy_ms, 3) if busy_ms else None,
        "gpu_busy_method": busy_how,
        "images_per_s": round(2 * args.batch / (ms * 1e-3), 2),  # source + target images
        "phases": phases,
        "warmup_s": round(warmup_s, 1),
        "host_syncs_per_step": syncs,
        "host_sync_sites": sites,
        "peak_mem_gb": round(peak_gb, 2) if peak_gb is not None else None,
        "flops_counted": counted,
        "flops_documented": documented,
        "peak_tflops": peak,
        "mfu_counted": mfu(counted),
        "mfu_documented": mfu(documented),
        "skipped_steps": skipped,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="", help="JSON output file")
    p.add_argument("--tiny", action="store_true", help="CPU smoke size (daformer_tiny, crop 64)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of "
                   + ", ".join(VARIANTS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--sync-steps", type=int, default=2)
    p.add_argument("--phase-steps", type=int, default=3, help="steps of the per-phase table")
    p.add_argument("--busy-steps", type=int, default=3, help="steps profiled for the GPU-busy time")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of bf16_dist_compiled (default inductor; with --tiny: eager, "
                        "which traces the step without generating code)")
    p.add_argument("--merge", action="store_true", help="keep the variants already in --out (add to them)")
    p.add_argument("--no-flops", dest="flops", action="store_false")
    args = p.parse_args(argv)
    if args.tiny:  # checks the script, measures nothing: one step of each kind per variant
        args.arch, args.crop, args.target, args.batch, args.proj_dim, args.memory = \
            "daformer_tiny", (32, 32), (32, 64), 2, 16, 8
        args.warmup, args.steps, args.sync_steps, args.phase_steps, args.flops = 0, 1, 0, 1, False
        args.busy_steps = 0
        args.compile_backend = args.compile_backend or "eager"
    else:
        args.arch, args.crop, args.target, args.batch, args.proj_dim, args.memory = \
            "daformer_mitb5", (640, 640), (640, 1280), 2, 512, 200
    args.compile_backend = args.compile_backend or "inductor"
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    return args


HEADER = (f"{'variant':<18} {'ms/iter':>8} {'b2b ms':>8} {'busy ms':>8} {'wall/busy':>9} {'img/s':>7} "
          f"{'syncs/step':>10} {'peak GB':>8} {'MFU':>6}")


def table_line(name: str, r: dict) -> str:
    if "error" in r:
        return f"{name:<18} ERROR {r['error'][:100]}"
    if "skipped" in r:
        return f"{name:<18} {r['skipped'][:110]}"
    mfu = r["mfu_counted"] if r["mfu_counted"] is not None else r["mfu_documented"]
    return (f"{name:<18} {r['ms_per_iter_median']:>8} {r['ms_per_iter_back_to_back']:>8} "
            f"{str(r.get('gpu_busy_ms_per_iter')):>8} {str(r.get('wall_over_busy')):>9} {r['images_per_s']:>7} "
            f"{str(r['host_syncs_per_step']):>10} {str(r['peak_mem_gb']):>8} "
            f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%':>6}")


def write_json(path: str, result: dict) -> None:
    """Whole file or nothing: a reader (or a kill) never sees half a JSON."""
    if not path:
        return
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device("cpu" if args.tiny else "auto")
    records = _Records()
    package_log = logging.getLogger("sepico_fast")
    package_log.addHandler(records)
    package_log.setLevel(logging.DEBUG)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "commit": os.environ.get("GPU_CHECK_COMMIT") or None,
              "implementations": implementation_lines(device), "variants": {}}
    if args.merge and args.out and Path(args.out).is_file():
        try:
            result["variants"] = dict(json.loads(Path(args.out).read_text()).get("variants") or {})
        except ValueError:
            pass  # written atomically: a damaged file is not ours to keep
    write_json(args.out, result)
    print("\n".join(result["implementations"]))
    print(HEADER, flush=True)
    failed = 0
    models: dict = {}  # one student/teacher pair for every variant (weights do not matter)
    for name in args.variants.split(","):
        print(f"[probe] {name} ...", flush=True)
        try:
            result["variants"][name] = probe_variant(args, name, VARIANTS[name], device, models, records)
        except Exception as exc:  # noqa: BLE001 - one failed variant must not hide the others
            failed += 1
            result["variants"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc()[-3000:]}
            print(traceback.format_exc())
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_json(args.out, result)
        print(table_line(name, result["variants"][name]), flush=True)
    first = next((r for r in result["variants"].values() if r.get("phases")), None)
    if first:
        print(f"phases of {first['config']['variant']} {first['config']['amp']} (ms per step, synchronised):")
        for row in first["phases"]:
            print(f"  {row['phase']:<20} {row['ms_per_step']:>9} {100 * row['share']:>5.1f}%")
    print(HEADER)
    for name, r in result["variants"].items():
        print(table_line(name, r))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
