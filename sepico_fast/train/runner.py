"""The training loop around ``train_step``: setup, resume, logging, evaluation, checkpoints.

Host syncs happen only here and only every ``log_interval`` iterations (reading the
accumulated losses and the skipped-step counter), at evaluations and at checkpoints.
"""
from __future__ import annotations

import datetime
import json
import time
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
from .uda import log_frequency_class_weights, make_teacher

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) used for MFU; fp32 runs are reported against
# the same peak (what mixed precision could reach).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0,
               "V100": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "RTX 2080 Ti": 107.0, "T4": 65.0}


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


def flops_per_iteration(cfg: TrainConfig, target_hw: tuple[int, int]) -> float | None:
    """Documented FLOP count of one iteration per rank (docs/training.md, "MFU").

    With F = backbone+decode forward and P = projection head forward per crop-sized image
    (``sepico_fast.models.flops``), backward = 2× forward, per image pair:
      student: 3 × [(F+P) source + (F+P) target crop + F mix]       (target pass counted with decode)
      teacher: F·(target area / crop area) + F crop regen + (F+P) weak source
    source_only: 3 × (F) per source image.
    """
    try:
        from ..models.flops import model_cost
        c = model_cost(cfg.arch, *cfg.crop_hw, num_classes=cfg.num_classes, proj_dim=cfg.proj_dim)
    except Exception:
        return None
    f, p = float(c.flops_infer), float(c.flops_proj)
    if cfg.method == "source_only":
        return 3 * f * cfg.batch_size
    contrast = 1.0  # worst case: after contrast_start
    area = target_hw[0] * target_hw[1] / (cfg.crop_hw[0] * cfg.crop_hw[1])
    student = 3 * ((f + contrast * p) + contrast * (f + p) + f)
    teacher = f * area + f + (f + p)
    return (student + teacher) * cfg.batch_size


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_TFLOPS.items():
        if key in name:
            return val
    return None


# ----------------------------------------------------------------------------------------
# Main entry
# ----------------------------------------------------------------------------------------
def run(cfg: TrainConfig) -> dict:
    """Train with ``cfg``; returns the final metrics dict (also written to metrics.json)."""
    from ..data import TrainLoader, build_datasets, val_loader

    pre_device = resolve_device(cfg)
    dist_info = init_distributed(pre_device.type)
    device = resolve_device(cfg, dist_info)
    main = dist_info.is_main
    work_dir = cfg.work_dir or default_work_dir(cfg)
    if dist_info.enabled:  # every rank uses rank 0's (timestamped) folder
        box = [work_dir]
        torch.distributed.broadcast_object_list(box, src=0)
        work_dir = box[0]
    work_dir = Path(work_dir)
    cfg.work_dir = str(work_dir)
    if main:
        work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    # --- data ------------------------------------------------------------------------------
    crop = tuple(cfg.crop) if min(cfg.crop) > 0 else None
    try:
        train_source, train_target, val_target = build_datasets(
            cfg.source, cfg.target, cfg.data_root or None, crop_size=crop)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--data-root / --source / --target: cannot load {cfg.source} -> {cfg.target} "
                         f"from {cfg.data_root or '$SEPICO_FAST_DATA or ./data'}: {err}") from None
    if crop is None:  # dataset default crop (synthetic pair)
        from ..data import dataset_defaults
        cfg.crop = list(dataset_defaults(cfg.source, cfg.target)["crop_size"])

    # --- models, optimizer, state -----------------------------------------------------------
    amp_dtype, scaler, amp_desc = amp_setup(cfg, device)
    student = build_segmentor(cfg.arch, cfg.num_classes, cfg.proj_dim, drop_path_rate=cfg.drop_path_rate,
                              pretrained=cfg.pretrained or None).to(device)
    broadcast_module(student)
    teacher = make_teacher(student) if cfg.method == "sepico" else None
    optimizer = build_optimizer(cfg, student, device)
    stats = (ClassStats(cfg.num_classes, cfg.proj_dim, cfg.memory_length if cfg.variant == "bank" else 0,
                        device=device, deterministic=cfg.deterministic) if cfg.method == "sepico" else None)
    class_weight = log_frequency_class_weights().to(device) if (cfg.dark_zurich and cfg.dz_class_weight) else None
    profiler = Profiler(profile=cfg.profile and main, nvtx=cfg.nvtx, device=device,
                        out_dir=work_dir / "profile", iters=cfg.profile_iters)
    ctx = StepContext(cfg=cfg, student=student, teacher=teacher, optimizer=optimizer, stats=stats, device=device,
                      amp_dtype=amp_dtype, scaler=scaler, class_weight=class_weight,
                      process_group=dist_info.group, world_size=dist_info.world_size, rank=dist_info.rank,
                      profiler=profiler)

    start_it = 0
    resume_path = ckpt_io.find_resume(cfg.resume, work_dir)
    if resume_path is not None:
        start_it = restore(ctx, ckpt_io.load_checkpoint(resume_path), device)
        if main:
            print(f"resumed from {resume_path} at iteration {start_it}")
    if cfg.compile:
        for m in (student, teacher):
            if m is not None:
                for name in ("extract", "decode", "project", "predict"):
                    setattr(m, name, torch.compile(getattr(m, name)))

    if main:
        (work_dir / "config.json").write_text(cfg.to_json() + "\n")
    writer = ScalarWriter(work_dir, enabled=main)
    loader = TrainLoader(train_source, train_target, cfg.batch_size, cfg.seed, start_iter=start_it,
                         pipeline=cfg.pipeline, device=device, rank=dist_info.rank,
                         world_size=dist_info.world_size, num_workers=cfg.num_workers)
    batches = iter(loader)

    target_hw = None
    flops_iter = None
    peak = device_peak_tflops(device)
    if main:
        method = cfg.method + (f"/{cfg.variant}" if cfg.method == "sepico" else "")
        print(f"sepico_fast.train: {method} {cfg.arch} {cfg.source}->{cfg.target} "
              f"iters={cfg.iters} batch={cfg.batch_size}x{dist_info.world_size} crop={cfg.crop_hw} "
              f"device={device} precision={amp_desc} work_dir={work_dir}")

    # --- loop --------------------------------------------------------------------------------
    acc: dict[str, torch.Tensor] = {}
    acc_n = 0
    bar = ProgressBar(cfg.iters, start_it) if main else None
    t_log, it_log = time.perf_counter(), start_it
    t_train0 = time.perf_counter()
    last_eval: dict | None = None
    end_it = min(cfg.stop_at, cfg.iters) if cfg.stop_at else cfg.iters
    for it in range(start_it, end_it):
        with profiler.phase("data"):
            src, tgt = next(batches)
        if target_hw is None:
            target_hw = tuple(tgt["img"].shape[-2:])
            flops_iter = flops_per_iteration(cfg, target_hw)
        debug = main and cfg.debug_interval > 0 and it % cfg.debug_interval == 0 and cfg.method == "sepico"
        out = train_step(ctx, src, tgt, it, debug=debug)
        profiler.step()
        for k, v in out["losses"].items():
            acc[k] = acc[k] + v if k in acc else v.clone()
        acc_n += 1
        if debug:
            save_debug_images(out["debug"], work_dir / "debug" / f"iter_{it:06d}.png")
        done = it + 1

        if done % cfg.log_interval == 0 or done == end_it:
            # The only host sync of the loop: losses and the skipped-step counter, read together.
            names = sorted(acc)
            values = torch.stack([acc[k].float() / acc_n for k in names] + [ctx.skipped.float()]).tolist()
            skipped = int(values.pop())
            now = time.perf_counter()
            ips = (done - it_log) * cfg.batch_size * dist_info.world_size * (2 if cfg.method == "sepico" else 1) \
                / max(now - t_log, 1e-9)
            scalars = {k: v for k, v in zip(names, values)}
            scalars.update(lr=optimizer.param_groups[0]["lr"], images_per_s=ips, skipped_steps=skipped)
            mfu = None
            if flops_iter and peak:
                mfu = flops_iter * dist_info.world_size * (done - it_log) / max(now - t_log, 1e-9) / (peak * 1e12)
                scalars["mfu"] = mfu
            if main:
                loss_txt = " ".join(f"{k}={v:.4f}" for k, v in zip(names, values))
                bar.update(done, f"{ips:.1f} img/s | MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                                 f"{loss_txt} | skipped {skipped}")
                writer.write(done, scalars)
            if skipped > cfg.max_skipped_steps:
                raise RuntimeError(
                    f"{skipped} optimizer steps were skipped because losses/gradients were NaN or Inf "
                    f"(limit --max-skipped-steps {cfg.max_skipped_steps}); lower --lr, check the data, or try "
                    "without --amp")
            acc, acc_n = {}, 0
            t_log, it_log = now, done

        if cfg.eval_interval and done % cfg.eval_interval == 0 and done != cfg.iters:
            last_eval = _evaluate(cfg, ctx, val_target, val_loader, device, amp_dtype, main, writer, done)
            t_log = time.perf_counter()
        if (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0) or done == end_it:
            if main:
                ckpt_io.save_checkpoint(work_dir, snapshot(ctx, done), done, cfg.keep_checkpoints)
            barrier()
    profiler.finish()
    train_time = time.perf_counter() - t_train0
    if end_it < cfg.iters:
        if main:
            print(f"stopped after iteration {end_it} (--stop-at); resume with --resume auto --work-dir {work_dir}")
        writer.close()
        barrier()
        shutdown()
        return {"stopped_at": end_it}

    # --- final evaluation ----------------------------------------------------------------------
    last_eval = _evaluate(cfg, ctx, val_target, val_loader, device, amp_dtype, main, writer, cfg.iters,
                          final=True)
    metrics = dict(last_eval or {})
    metrics.update(iters=cfg.iters, train_seconds=round(train_time, 2), method=cfg.method, variant=cfg.variant,
                   arch=cfg.arch, seed=cfg.seed, source=cfg.source, target=cfg.target, precision=amp_desc,
                   skipped_steps=int(ctx.skipped.item()))
    if main:
        (work_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"metrics: {work_dir / 'metrics.json'}")
    writer.close()
    barrier()
    shutdown()
    return metrics


def _evaluate(cfg, ctx, val_target, val_loader, device, amp_dtype, main, writer, it, final=False):
    """Student evaluation on rank 0 (others wait at the barrier)."""
    result = None
    if main:
        cm = evaluate_model(ctx.student, val_loader(val_target, device), cfg.num_classes, device=device,
                            amp_dtype=amp_dtype, max_images=cfg.eval_max_images)
        result = iou_summary(cm)
        names = None
        print()
        print(iou_table([v / 100.0 for v in result["per_class_iou"]], title=cfg.target))
        writer.write(it, {"val/miou": result["miou"]})
        del names
    barrier()
    return result


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
