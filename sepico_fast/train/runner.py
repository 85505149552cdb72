"""The training loop around ``train_step``: setup, the loop, the finish.

    run(cfg)  =  setup(cfg) -> TrainRun  ->  train_loop(run)  ->  finish(run)

Host syncs happen only in ``train_loop``'s logging block (every ``log_interval``
iterations: the accumulated losses and the skipped-step counter), at evaluations and at
checkpoints.
"""
from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..contrast import ClassStats
from ..evaluate import evaluate_model, iou_summary
from ..models import build_segmentor, param_groups
from . import checkpointing as ckpt_io
from .config import TrainConfig
from .ddp import DistInfo, barrier, broadcast_module, init_distributed, shutdown
from .debug_images import save_debug_images
from .logging import ProgressBar, ScalarWriter, iou_table
from .profiling import Profiler
from .step import StepContext, train_step
from .throughput import device_peak_tflops, flops_per_iteration
from .uda import log_frequency_class_weights, make_teacher


# ----------------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------------
def resolve_device(cfg: TrainConfig, dist_info: DistInfo | None = None) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist_info.local_rank if dist_info else 0)
        return torch.device("cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {cfg.device} requested but CUDA is not available")
    return dev


def amp_setup(cfg: TrainConfig, device: torch.device):
    """(autocast dtype or None, GradScaler or None, description).

    CUDA: bf16 autocast when the GPU supports it, else fp16 + GradScaler. CPU: float32
    unless ``--cpu-amp``: bf16 autocast measured slower than float32 for the tiny models on
    the 2-core development machine (see docs/training.md), so --amp alone keeps fp32 there.
    """
    if not cfg.amp:
        return None, None, "float32"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, None, "bf16 autocast"
        return torch.float16, torch.amp.GradScaler("cuda"), "fp16 autocast + GradScaler"
    if cfg.cpu_amp:
        return torch.bfloat16, None, "bf16 autocast (cpu)"
    return None, None, "float32 (--amp on CPU: bf16 autocast is slower here; --cpu-amp forces it)"


def default_work_dir(cfg: TrainConfig) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
    name = f"{cfg.preset}_{cfg.method}" + (f"_{cfg.variant}" if cfg.method == "sepico" else "")
    return str(Path("work_dirs") / f"{name}_s{cfg.seed}_{stamp}")


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.head_lr_mult)
    for g in groups:
        g["initial_lr"] = g["lr"]
    # fused: one kernel per step, and it honours a device-side found_inf flag (no sync).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                             fused=True)


# ----------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------
@dataclass
class TrainRun:
    """Everything ``setup`` builds and the loop and the finish use."""
    cfg: TrainConfig
    dist_info: DistInfo
    device: torch.device
    work_dir: Path
    ctx: StepContext
    amp_desc: str
    val_target: object
    writer: ScalarWriter
    loader: object
    start_it: int
    end_it: int
    last_eval: dict | None = None
    train_seconds: float = 0.0

    @property
    def main(self) -> bool:
        return self.dist_info.is_main


def _work_dir(cfg: TrainConfig, dist_info: DistInfo) -> Path:
    work_dir = cfg.work_dir or default_work_dir(cfg)
    if dist_info.enabled:  # every rank uses rank 0's (timestamped) folder
        box = [work_dir]
        torch.distributed.broadcast_object_list(box, src=0)
        work_dir = box[0]
    cfg.work_dir = str(work_dir)
    if dist_info.is_main:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    return Path(work_dir)


def _datasets(cfg: TrainConfig):
    """(train_source, train_target, val_target); resolves ``--crop 0`` to the dataset default."""
    from ..data import build_datasets, dataset_defaults

    crop = tuple(cfg.crop) if min(cfg.crop) > 0 else None
    try:
        datasets = build_datasets(cfg.source, cfg.target, cfg.data_root or None, crop_size=crop)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--data-root / --source / --target: cannot load {cfg.source} -> {cfg.target} "
                         f"from {cfg.data_root or '$SEPICO_FAST_DATA or ./data'}: {err}") from None
    if crop is None:  # dataset default crop (synthetic pair)
        cfg.crop = list(dataset_defaults(cfg.source, cfg.target)["crop_size"])
    return datasets


def _step_context(cfg: TrainConfig, device: torch.device, dist_info: DistInfo, work_dir: Path):
    """(StepContext with models, optimizer and statistics, precision description)."""
    amp_dtype, scaler, amp_desc = amp_setup(cfg, device)
    student = build_segmentor(cfg.arch, cfg.num_classes, cfg.proj_dim, drop_path_rate=cfg.drop_path_rate,
                              pretrained=cfg.pretrained or None).to(device)
    broadcast_module(student)
    teacher = make_teacher(student) if cfg.method == "sepico" else None
    optimizer = build_optimizer(cfg, student, device)
    stats = (ClassStats(cfg.num_classes, cfg.proj_dim, cfg.memory_length if cfg.variant == "bank" else 0,
                        device=device, deterministic=cfg.deterministic) if cfg.method == "sepico" else None)
    class_weight = log_frequency_class_weights().to(device) if (cfg.dark_zurich and cfg.dz_class_weight) else None
    profiler = Profiler(profile=cfg.profile and dist_info.is_main, nvtx=cfg.nvtx, device=device,
                        out_dir=work_dir / "profile", iters=cfg.profile_iters)
    ctx = StepContext(cfg=cfg, student=student, teacher=teacher, optimizer=optimizer, stats=stats, device=device,
                      amp_dtype=amp_dtype, scaler=scaler, class_weight=class_weight,
                      process_group=dist_info.group, world_size=dist_info.world_size, rank=dist_info.rank,
                      profiler=profiler)
    return ctx, amp_desc


def _compile_models(ctx: StepContext, backend="inductor") -> None:
    """``torch.compile`` the three pieces of each network: ``extract``, ``decode``, ``project``.

    ``predict`` and ``forward`` call those pieces, so one graph exists per (network, piece,
    input shape, grad mode) and nothing recompiles after the first iteration (and the
    first evaluation): the teacher's backbone and decoder see the full target image and the
    crop, its backbone and projection head the source crop; the student's pieces see the
    training crop (and the evaluation size). ``dynamic=False``: static shapes give the
    fastest kernels, and there are only a few of them. Compile times: bench/NOTES.md."""
    # Inductor's layout optimisation turns convolution inputs to channels_last: on the CPU
    # that makes oneDNN's weight gradients several times slower (bench/NOTES.md), so it is
    # off there; on CUDA channels_last is what cuDNN wants.
    options = {"layout_optimization": False} if (backend == "inductor" and ctx.device.type == "cpu") else None
    for m in (ctx.student, ctx.teacher):
        if m is not None:
            for name in ("extract", "decode", "project"):
                setattr(m, name, torch.compile(getattr(m, name), dynamic=False, backend=backend, options=options))


def setup(cfg: TrainConfig) -> TrainRun:
    """Process group, work dir, data, models, optimizer, statistics, resume, loader."""
    from ..data import TrainLoader

    dist_info = init_distributed(resolve_device(cfg).type)
    device = resolve_device(cfg, dist_info)
    work_dir = _work_dir(cfg, dist_info)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    train_source, train_target, val_target = _datasets(cfg)
    ctx, amp_desc = _step_context(cfg, device, dist_info, work_dir)

    start_it = 0
    resume_path = ckpt_io.find_resume(cfg.resume, work_dir)
    if resume_path is not None:
        start_it = restore(ctx, ckpt_io.load_checkpoint(resume_path), device)
        if dist_info.is_main:
            print(f"resumed from {resume_path} at iteration {start_it}")
    if cfg.compile:
        _compile_models(ctx)
    if dist_info.is_main:
        (work_dir / "config.json").write_text(cfg.to_json() + "\n")
    writer = ScalarWriter(work_dir, enabled=dist_info.is_main)
    loader = TrainLoader(train_source, train_target, cfg.batch_size, cfg.seed, start_iter=start_it,
                         pipeline=cfg.pipeline, device=device, rank=dist_info.rank,
                         world_size=dist_info.world_size, num_workers=cfg.num_workers)
    end_it = min(cfg.stop_at, cfg.iters) if cfg.stop_at else cfg.iters
    if dist_info.is_main:
        method = cfg.method + (f"/{cfg.variant}" if cfg.method == "sepico" else "")
        print(f"sepico_fast.train: {method} {cfg.arch} {cfg.source}->{cfg.target} "
              f"iters={cfg.iters} batch={cfg.batch_size}x{dist_info.world_size} crop={cfg.crop_hw} "
              f"device={device} precision={amp_desc} work_dir={work_dir}")
    return TrainRun(cfg=cfg, dist_info=dist_info, device=device, work_dir=work_dir, ctx=ctx, amp_desc=amp_desc,
                    val_target=val_target, writer=writer, loader=loader, start_it=start_it, end_it=end_it)


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------
class _LogWindow:
    """Loss sums and timing since the last log line."""

    def __init__(self, start_it: int):
        self.acc: dict[str, torch.Tensor] = {}
        self.n = 0
        self.reset(start_it)

    def reset(self, it: int) -> None:
        self.acc, self.n = {}, 0
        self.t0, self.it0 = time.perf_counter(), it

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            self.acc[k] = self.acc[k] + v if k in self.acc else v.clone()
        self.n += 1


def _log(run: TrainRun, window: _LogWindow, done: int, bar: ProgressBar | None, flops_iter, peak) -> None:
    """The only host sync of the loop: losses and the skipped-step counter, read together."""
    cfg, ctx = run.cfg, run.ctx
    world = run.dist_info.world_size
    names = sorted(window.acc)
    values = torch.stack([window.acc[k].float() / window.n for k in names] + [ctx.skipped.float()]).tolist()
    skipped = int(values.pop())
    seconds = max(time.perf_counter() - window.t0, 1e-9)
    iters = done - window.it0
    ips = iters * cfg.batch_size * world * (2 if cfg.method == "sepico" else 1) / seconds
    scalars = {k: v for k, v in zip(names, values)}
    scalars.update(lr=ctx.optimizer.param_groups[0]["lr"], images_per_s=ips, skipped_steps=skipped)
    mfu = None
    if flops_iter and peak:
        mfu = flops_iter * world * iters / seconds / (peak * 1e12)
        scalars["mfu"] = mfu
    if run.main:
        loss_txt = " ".join(f"{k}={v:.4f}" for k, v in zip(names, values))
        bar.update(done, f"{ips:.1f} img/s | MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                         f"{loss_txt} | skipped {skipped}")
        run.writer.write(done, scalars)
    if skipped > cfg.max_skipped_steps:
        raise RuntimeError(
            f"{skipped} optimizer steps were skipped because losses/gradients were NaN or Inf "
            f"(limit --max-skipped-steps {cfg.max_skipped_steps}); lower --lr, check the data, or try "
            "without --amp")
    window.reset(done)


def train_loop(run: TrainRun) -> None:
    """Iterations ``start_it .. end_it - 1`` with logging, evaluations and checkpoints."""
    cfg, ctx = run.cfg, run.ctx
    profiler = ctx.profiler
    batches = iter(run.loader)
    bar = ProgressBar(cfg.iters, run.start_it) if run.main else None
    window = _LogWindow(run.start_it)
    flops_iter, peak = None, device_peak_tflops(run.device)
    t_train0 = time.perf_counter()
    for it in range(run.start_it, run.end_it):
        with profiler.phase("data"):
            src, tgt = next(batches)
        if flops_iter is None:
            flops_iter = flops_per_iteration(cfg, tuple(tgt["img"].shape[-2:]))
        debug = run.main and cfg.debug_interval > 0 and it % cfg.debug_interval == 0 and cfg.method == "sepico"
        out = train_step(ctx, src, tgt, it, debug=debug)
        profiler.step()
        window.add(out["losses"])
        if debug:
            save_debug_images(out["debug"], run.work_dir / "debug" / f"iter_{it:06d}.png")
        done = it + 1
        if done % cfg.log_interval == 0 or done == run.end_it:
            _log(run, window, done, bar, flops_iter, peak)
        if cfg.eval_interval and done % cfg.eval_interval == 0 and done != cfg.iters:
            run.last_eval = _evaluate(run, done)
            window.t0 = time.perf_counter()
        if (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0) or done == run.end_it:
            if run.main:
                ckpt_io.save_checkpoint(run.work_dir, snapshot(ctx, done), done, cfg.keep_checkpoints)
            barrier()
    profiler.finish()
    run.train_seconds = time.perf_counter() - t_train0


def _evaluate(run: TrainRun, it: int) -> dict | None:
    """Student evaluation on rank 0 (others wait at the barrier)."""
    from ..data import val_loader

    cfg, ctx, result = run.cfg, run.ctx, None
    if run.main:
        cm = evaluate_model(ctx.student, val_loader(run.val_target, run.device), cfg.num_classes,
                            device=run.device, amp_dtype=ctx.amp_dtype, max_images=cfg.eval_max_images)
        result = iou_summary(cm)
        print()
        print(iou_table([v / 100.0 for v in result["per_class_iou"]], title=cfg.target))
        run.writer.write(it, {"val/miou": result["miou"]})
    barrier()
    return result


# ----------------------------------------------------------------------------------------
# The finish
# ----------------------------------------------------------------------------------------
def finish(run: TrainRun) -> dict:
    """Final evaluation and metrics.json (or the --stop-at note); closes the process group."""
    cfg = run.cfg
    try:
        if run.end_it < cfg.iters:
            if run.main:
                print(f"stopped after iteration {run.end_it} (--stop-at); resume with --resume auto "
                      f"--work-dir {run.work_dir}")
            return {"stopped_at": run.end_it}
        run.last_eval = _evaluate(run, cfg.iters)
        metrics = dict(run.last_eval or {})
        metrics.update(iters=cfg.iters, train_seconds=round(run.train_seconds, 2), method=cfg.method,
                       variant=cfg.variant, arch=cfg.arch, seed=cfg.seed, source=cfg.source, target=cfg.target,
                       precision=run.amp_desc, skipped_steps=int(run.ctx.skipped.item()))
        if run.main:
            (run.work_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            print(f"metrics: {run.work_dir / 'metrics.json'}")
        return metrics
    finally:
        run.writer.close()
        barrier()
        shutdown()


def run(cfg: TrainConfig) -> dict:
    """Train with ``cfg``; returns the final metrics dict (also written to metrics.json)."""
    state = setup(cfg)
    train_loop(state)
    return finish(state)


# ----------------------------------------------------------------------------------------
# Checkpoint state
# ----------------------------------------------------------------------------------------
def snapshot(ctx: StepContext, it_done: int) -> dict:
    cfg = ctx.cfg
    state_dict = ckpt_io.prefixed("model.", ctx.student.state_dict())
    if ctx.teacher is not None:
        state_dict.update(ckpt_io.prefixed("ema_model.", ctx.teacher.state_dict()))
    return {
        "state_dict": state_dict,
        "optimizer": ctx.optimizer.state_dict(),
        "meta": {"iter": it_done, "config": cfg.to_dict(),
                 "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "format": "sepico_fast/1"},
        "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
        "class_stats": ctx.stats.state_dict() if ctx.stats is not None else None,
        "rng": ckpt_io.rng_state(),
        "counters": {"skipped": ctx.skipped.detach().cpu()},
    }


def restore(ctx: StepContext, ckpt: dict, device: torch.device) -> int:
    """Load a ``snapshot`` into ``ctx``; returns the next iteration."""
    ctx.student.load_state_dict(ckpt_io.unprefixed("model.", ckpt["state_dict"]))
    if ctx.teacher is not None:
        ema = ckpt_io.unprefixed("ema_model.", ckpt["state_dict"])
        if ema:
            ctx.teacher.load_state_dict(ema)
    if ckpt.get("optimizer") is not None:
        ctx.optimizer.load_state_dict(ckpt["optimizer"])
    if ctx.scaler is not None and ckpt.get("scaler") is not None:
        ctx.scaler.load_state_dict(ckpt["scaler"])
    if ctx.stats is not None and ckpt.get("class_stats") is not None:
        ctx.stats.load_state_dict(ckpt["class_stats"])
        ctx.stats.to(device)
    if ckpt.get("rng"):
        ckpt_io.set_rng_state(ckpt["rng"])
    counters = ckpt.get("counters") or {}
    if "skipped" in counters:
        ctx.skipped.copy_(torch.as_tensor(counters["skipped"]).to(ctx.skipped))
    return int(ckpt["meta"]["iter"])
