"""Whole-iteration benchmark: ``train_step`` (fast) vs ``bench/upstream_step.py`` (the authors' dataflow).

One configuration = fresh processes (``python -m bench.step_harness ...``):

* ``--dataflow both``: the fast step, the upstream dataflow and the ``upstream_tf32_foreach``
  baseline (TF32 + foreach AdamW, see ``bench/upstream_step.py``) built in one process from
  the same initial weights and timed *interleaved* — each measured iteration runs them back
  to back, alternating the order — so that load from other processes hits all alike.
  Median of ``--repeats`` iterations after ``--warmup`` ones (the warm-up times are
  reported too: with ``--compile`` they hold the compilation);
* ``--dataflow fast|upstream --memory``: one dataflow alone, warm-up + one iteration, then
  the peak memory of the process: CPU peak RSS (``VmHWM``), CUDA ``max_memory_allocated``.

Each prints one JSON line. The iteration is SePiCo after ``contrast_start`` with DistCL and
the regulariser, jitter and blur on (only iterations whose draws enable both are used),
target images of crop × 2·crop as in the paper (640 × 1280 for 640 crops), random init.
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "30000")  # as sepico_fast.train (before torch loads)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bench_config(arch: str, crop: int, batch: int, **overrides):
    from sepico_fast.train.config import make_config

    values = dict(arch=arch, crop=[crop, crop], batch_size=batch, iters=40000, warmup_iters=0,
                  contrast_start=0, variant="dist", reg_weight=1.0, proj_dim=512, color_jitter_p=0.0,
                  blur=True, pseudo_threshold=0.968, ema_alpha=0.999, source="gta", target="cityscapes",
                  pretrained="")
    values.update(overrides)
    return make_config(values, preset="synthetic")


def synthetic_batches(batch: int, crop: int, device, seed: int = 0):
    """Source [B,3,crop,crop] with blocky labels (16-pixel cells), target [B,3,crop,2·crop]."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, 19, (batch, 1, crop // 16, crop // 16), generator=g)
    gt = cells.repeat_interleave(16, 2).repeat_interleave(16, 3)
    src = {"img": torch.randn(batch, 3, crop, crop, generator=g).to(device), "gt": gt.to(device)}
    tgt = {"img": torch.randn(batch, 3, crop, 2 * crop, generator=g).to(device)}
    return src, tgt


def strong_iterations(cfg, count: int, start: int = 1) -> list[int]:
    """The first ``count`` iterations >= start whose per-iteration draws turn jitter and blur on."""
    from sepico_fast import augment
    from sepico_fast.train.step import iteration_rng

    its, it = [], start
    while len(its) < count:
        rng, _ = iteration_rng(cfg.seed, it, 0, torch.device("cpu"))
        p = augment.draw_strong_params(rng, cfg.color_jitter_strength, cfg.color_jitter_p, cfg.blur)
        if p.jitter and p.blur:
            its.append(it)
        it += 1
    return its


def build_fast(cfg, device, student, amp_dtype=None, compile_models=False):
    from sepico_fast.contrast import ClassStats
    from sepico_fast.train.runner import build_optimizer, compile_step
    from sepico_fast.train.step import StepContext, train_step
    from sepico_fast.train.uda import make_teacher

    ctx = StepContext(cfg=cfg, student=student, teacher=make_teacher(student),
                      optimizer=build_optimizer(cfg, student, device),
                      stats=ClassStats(cfg.num_classes, cfg.proj_dim, device=device), device=device,
                      amp_dtype=amp_dtype)
    if compile_models:
        compile_step(ctx)
    return lambda src, tgt, it: train_step(ctx, src, tgt, it)


def build_upstream(cfg, device, student, tf32_foreach=False):
    sys.path.insert(0, str(ROOT))
    from bench.upstream_step import build_upstream_step, upstream_train_step

    u = build_upstream_step(cfg, device, student, tf32_foreach=tf32_foreach)
    return lambda src, tgt, it: upstream_train_step(u, src, tgt, it)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def run(args) -> dict:
    from sepico_fast.device import resolve_device
    from sepico_fast.models import build_segmentor

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp_dtype = torch.bfloat16 if args.precision == "bf16" else None
    cfg = bench_config(args.arch, args.crop, args.batch)
    flows = ["fast", "upstream", "upstream_tf32_foreach"] if args.dataflow == "both" else [args.dataflow]
    if args.compile and args.with_eager and "fast" in flows:
        flows.append("fast_eager")  # the same fast step without compilation, interleaved too
    torch.manual_seed(cfg.seed)
    base = build_segmentor(cfg.arch, cfg.num_classes, cfg.proj_dim, drop_path_rate=cfg.drop_path_rate).to(device)
    steps = {}
    t0 = time.perf_counter()
    for name in flows:
        student = copy.deepcopy(base)
        # The upstream baseline is always what the authors ran: fp32, eager.
        if name.startswith("upstream"):
            steps[name] = build_upstream(cfg, device, student, tf32_foreach=name == "upstream_tf32_foreach")
        else:
            steps[name] = build_fast(cfg, device, student, amp_dtype, args.compile and name == "fast")
    setup_s = time.perf_counter() - t0
    del base
    src, tgt = synthetic_batches(args.batch, args.crop, device)
    its = strong_iterations(cfg, args.warmup + args.repeats)
    rss_setup = _vm_kb("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = {n: [] for n in flows}
    cpu_times = {n: [] for n in flows}  # process CPU time: less sensitive to other processes' load
    for k, it in enumerate(its):
        order = flows if k % 2 == 0 else flows[::-1]
        for name in order:
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            steps[name](src, tgt, it)
            _sync(device)
            times[name].append((time.perf_counter() - t) * 1e3)
            cpu_times[name].append((time.process_time() - c) * 1e3)
    out = {"arch": args.arch, "crop": args.crop, "batch": args.batch, "precision": args.precision,
           "compile": bool(args.compile), "device": str(device), "threads": torch.get_num_threads(),
           "setup_s": round(setup_s, 2), "iterations": its}
    for name in flows:
        warm, meas = times[name][:args.warmup], times[name][args.warmup:]
        cpu = cpu_times[name][args.warmup:]
        out[name] = {"median_ms": statistics.median(meas) if meas else None,
                     "times_ms": [round(t, 1) for t in meas], "warmup_ms": [round(t, 1) for t in warm],
                     "cpu_median_ms": statistics.median(cpu) if cpu else None}
    if args.memory:
        if device.type == "cuda":
            out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            out["peak_mem_mb"] = _vm_kb("VmHWM") / 1024
            out["rss_setup_mb"] = rss_setup / 1024
    return out


def subprocess_run(arch: str, crop: int, batch: int, *, dataflow: str = "both", device: str = "cpu",
                   precision: str = "fp32", compile_models: bool = False, warmup: int = 2, repeats: int = 5,
                   memory: bool = False, threads: int = 0, timeout: float = 3600) -> dict:
    """Run one configuration in a fresh Python process and return its JSON result."""
    cmd = [sys.executable, "-m", "bench.step_harness", "--arch", arch, "--crop", str(crop), "--batch", str(batch),
           "--dataflow", dataflow, "--device", device, "--precision", precision, "--warmup", str(warmup),
           "--repeats", str(repeats), "--threads", str(threads)]
    if compile_models:
        cmd.append("--compile")
    if memory:
        cmd.append("--memory")
    return run_json_process(cmd, timeout, GOMP_SPINCOUNT="30000")


def run_json_process(cmd: list[str], timeout: float, **env_defaults: str) -> dict:
    """Run a bench module in a fresh process (this checkout first on PYTHONPATH, ``env_defaults``
    unless set) and return the JSON object its last stdout line holds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for key, value in env_defaults.items():
        env.setdefault(key, value)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.step_harness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="daformer_mitb0")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="source images (and target images) per iteration")
    p.add_argument("--dataflow", choices=("both", "fast", "upstream", "upstream_tf32_foreach"), default="both")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="of the fast dataflow (autocast); the upstream baseline is always fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast dataflow's models")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--with-eager", action="store_true", help="with --compile: also time the eager fast step")
    p.add_argument("--memory", action="store_true", help="report the process's peak memory")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    print(json.dumps(run(p.parse_args(argv))))


if __name__ == "__main__":
    main()
