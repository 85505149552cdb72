"""``--resume``: find and verify the checkpoint, continue with ITS config, load its state.

``resolve_resume`` runs first in ``runner.setup``, before anything is built:

* ``--resume auto`` takes the newest intact checkpoint of ``--work-dir`` (a damaged one is
  skipped with a warning naming it); with none yet it says so and starts at iteration 0,
  so the same command serves the first start and every restart of a preemptible job;
* ``--resume PATH`` takes that file (and, without ``--work-dir``, its folder);
* the run continues with the checkpoint's config: flags given now are checked against it
  by ``config.resumed_config`` (method/data changes refused unless ``--resume-override``);
* so is the number of processes (``meta.world_size``): with another one ``--ddp-schedule
  samples`` would divide the step counts by the new number and ``steps`` would change the
  batch of every step, so it is refused too unless ``--resume-override``.

Messages are printed by rank 0 only (``RANK`` is read from the environment: the process
group does not exist yet).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..reporting import first_line
from . import run_checkpoints
from .config import TrainConfig, resumed_config


def _main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _say(text: str, err: bool = False) -> None:
    if _main_rank():
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


def resolve_resume(cfg: TrainConfig) -> tuple[TrainConfig, dict | None, Path | None]:
    """(config to train with, loaded checkpoint or None, its path or None)."""
    if not cfg.resume:
        return cfg, None, None
    if cfg.resume == "auto":
        work_dir = Path(cfg.work_dir)
        try:
            path, ckpt, skipped = run_checkpoints.load_newest_intact(work_dir)
        except run_checkpoints.CheckpointFormatError as exc:
            raise SystemExit(f"--resume auto: {exc}") from None
        if path is None and skipped:
            raise SystemExit(f"--resume auto: no intact checkpoint in {work_dir}: "
                             + "; ".join(f"{Path(e.path).name}: {e.reason}" for e in skipped))
        if path is None:
            _say(f"--resume auto: no checkpoint in {work_dir} yet; starting at iteration 0")
            return cfg, None, None
        for err in skipped:
            _say(f"warning: --resume auto: skipped {err.path} ({err.reason}); resuming from {path} "
                 f"(iteration {ckpt['meta']['iter']})", err=True)
    else:
        path = Path(cfg.resume)
        try:
            ckpt = run_checkpoints.load_checkpoint(path)
        except run_checkpoints.CheckpointError as exc:
            raise SystemExit(f"--resume: {exc}") from None
    try:
        new_cfg, applied = resumed_config(ckpt["meta"].get("config") or {}, cfg, path)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    _check_world_size(ckpt["meta"], path, new_cfg)
    for change in applied:
        _say(f"--resume: applied {change}")
    emergency = ckpt["meta"].get("emergency") or {}
    if emergency.get("partial_step"):
        it = int(ckpt["meta"]["iter"])
        _say(f"warning: --resume: {path} is an emergency checkpoint taken inside iteration {it + 1} "
             f"({emergency.get('reason', 'an exception')}): the teacher and the class statistics may include part "
             "of that iteration, so this run is close to, not bitwise equal to, an uninterrupted one", err=True)
    return new_cfg, ckpt, path


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_world_size(meta: dict, path: Path, cfg: TrainConfig) -> None:
    """Refuse another number of processes than the checkpoint's (unless --resume-override)."""
    saved, now = meta.get("world_size"), _world_size()
    if saved is None or int(saved) == now:  # files from before the world size was recorded: unknown
        return
    effect = ("--ddp-schedule samples would divide the step counts by the new number (another schedule)"
              if cfg.ddp_schedule == "samples" else
              f"--ddp-schedule steps would train on {cfg.batch_size} x {now} images per step instead of "
              f"{cfg.batch_size} x {saved}")
    change = f"world size {saved} -> {now}"
    if not cfg.resume_override:
        raise SystemExit(f"--resume: {path} was trained by {saved} process(es), this run has {now} ({change}): "
                         f"{effect}; start it with {saved} process(es), or add --resume-override to continue anyway")
    _say(f"warning: --resume-override: {change}: {effect}", err=True)


def restore_checkpoint(ctx, ckpt: dict, path: Path, device: torch.device) -> int:
    """``run_checkpoints.restore`` with one line instead of a state_dict traceback when the
    weights do not fit the model (possible only with --resume-override)."""
    try:
        return run_checkpoints.restore(ctx, ckpt, device)
    except (RuntimeError, ValueError, KeyError) as exc:
        saved = ckpt["meta"].get("config") or {}
        was = ", ".join(f"{k} {saved.get(k)!r}" for k in ("arch", "proj_dim", "variant", "method", "memory_length"))
        raise SystemExit(f"--resume: the state in {path} does not fit this run's model (it was trained with {was}): "
                         f"{type(exc).__name__}: {first_line(exc, 160)}") from None
