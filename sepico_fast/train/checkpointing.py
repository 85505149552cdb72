"""Checkpoints: one dict of state_dicts, written atomically, read back for exact resume.

Layout (a superset of an mmcv/upstream SePiCo checkpoint, so upstream tools and
``sepico_fast.checkpoint.load_official`` read it):

    {"state_dict": {"model.<key>": ..., "ema_model.<key>": ...},   # student + teacher
     "optimizer": ..., "meta": {"iter": t, "config": {...}, ...},
     "scaler": ..., "class_stats": ..., "rng": {...}, "counters": {...}}

``iter`` is the number of completed iterations: resuming runs iteration ``iter`` next.
The data pipeline and the per-iteration random generators are pure functions of
(seed, iteration), so the saved RNG states are only a belt-and-braces extra.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

CKPT_RE = re.compile(r"^iter_(\d+)\.pt$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prefixed(prefix: str, state_dict: dict) -> dict:
    return {prefix + k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state_dict.items()}


def unprefixed(prefix: str, flat: dict) -> dict:
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save to a temp file in the same folder, fsync, then os.replace (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def save_checkpoint(work_dir: str | os.PathLike, state: dict, it: int, keep: int = 2) -> Path:
    """Write ``iter_<it>.pt`` and ``latest.pt`` atomically; keep the newest ``keep`` iter files."""
    work_dir = Path(work_dir)
    path = atomic_save(state, work_dir / f"iter_{it:06d}.pt")
    latest = work_dir / "latest.pt"
    tmp = work_dir / f".latest.pt.tmp{os.getpid()}"
    if tmp.exists():
        tmp.unlink()
    try:  # a hard link costs nothing; fall back to a second copy
        os.link(path, tmp)
        os.replace(tmp, latest)
    except OSError:
        atomic_save(state, latest)
    if keep > 0:
        found = sorted((int(m.group(1)), p) for p in work_dir.iterdir() if (m := CKPT_RE.match(p.name)))
        for _, old in found[:-keep]:
            old.unlink(missing_ok=True)
    return path


def find_resume(resume: str, work_dir: str | os.PathLike) -> Path | None:
    """'' -> None; 'auto' -> <work_dir>/latest.pt if present; else the given path (must exist)."""
    if not resume:
        return None
    if resume == "auto":
        latest = Path(work_dir) / "latest.pt"
        return latest if latest.exists() else None
    path = Path(resume)
    if not path.is_file():
        raise ValueError(f"--resume: checkpoint {str(path)!r} does not exist")
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if "state_dict" not in ckpt or "meta" not in ckpt:
        raise ValueError(f"--resume: {path} is not a sepico_fast training checkpoint "
                         "(expected keys 'state_dict' and 'meta')")
    return ckpt
