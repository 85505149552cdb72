"""Checkpoints: one dict of state_dicts, written atomically, verified when read back.

Layout (a superset of an mmcv/upstream SePiCo checkpoint, so upstream tools and
``sepico_fast.checkpoint.load_official`` read it):

    {"state_dict": {"model.<key>": ..., "ema_model.<key>": ...},   # student + teacher
     "optimizer": ..., "meta": {"iter": t, "config": {...}, "format": "sepico_fast/2", ...},
     "scaler": ..., "class_stats": ..., "rng": {...}, "counters": {...}}

Everything in it is a tensor or a plain Python value, so ``torch.load(weights_only=True)``
reads it (format 2; format 1 pickled numpy's RNG state). ``iter`` is the number of completed
iterations: resuming runs iteration ``iter`` next. The data pipeline and the per-iteration
random generators are pure functions of (seed, iteration), so the saved RNG states are only
a belt-and-braces extra.

On disk, per checkpoint: ``iter_<t>.pt`` and ``iter_<t>.pt.sha256`` (``sha256sum -c``
format); ``latest.pt`` (+ ``.sha256``) is an independent copy of the newest one, not a link,
so damage to one file leaves the other. A file is written to ``.<name>.tmp<pid>``, fsynced
and renamed, so a crash leaves either the old or the new file, plus at most a temp file that
``remove_stale_temp_files`` deletes at the next start.
"""
from __future__ import annotations

import datetime
import errno
import hashlib
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import TRAINING_FORMAT, newer_format_reason
from ..reporting import first_line

FORMAT = TRAINING_FORMAT
CKPT_RE = re.compile(r"^iter_(\d+)\.pt$")
TEMP_RE = re.compile(r"^\.(?:iter_\d+|latest)\.pt(?:\.sha256)?\.tmp(\d+)$")
_CHUNK = 1 << 22


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; ``str()`` is one line naming it."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")


class CheckpointFormatError(CheckpointError):
    """An intact checkpoint of a newer format (unknown format string or config field):
    never skipped as damaged, never read."""


class CheckpointWriteError(Exception):
    """A checkpoint that could not be written (full disk, ...); ``str()`` is one line."""


# ----------------------------------------------------------------------------- state

def rng_state() -> dict:
    """Global RNG states as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        # Only the devices this machine has: a checkpoint of an 8-GPU node resumed on 1 GPU
        # (or the reverse) is fine; the data RNG is a function of (seed, iteration) anyway.
        for index in range(min(len(state["cuda"]), torch.cuda.device_count())):
            torch.cuda.set_rng_state(state["cuda"][index], index)


def prefixed(prefix: str, state_dict: dict) -> dict:
    return {prefix + k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state_dict.items()}


def unprefixed(prefix: str, flat: dict) -> dict:
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def snapshot(ctx, it_done: int, config=None, counters: dict | None = None, **meta) -> dict:
    """The checkpoint dict of a ``StepContext`` after ``it_done`` completed iterations.

    ``config`` is the run's requested config (before ``--ddp-schedule samples`` divides
    its counts; default ``ctx.cfg``): resuming re-applies the schedule to it. ``meta``
    adds plain values to ``meta`` (the runner's: ``world_size``, ``schedule``),
    ``counters`` to ``counters`` (the runner's: ``train_seconds`` so far, over resumes)."""
    state_dict = prefixed("model.", ctx.student.state_dict())
    if ctx.teacher is not None:
        state_dict.update(prefixed("ema_model.", ctx.teacher.state_dict()))
    return {
        "state_dict": state_dict,
        "optimizer": ctx.optimizer.state_dict(),
        "meta": {"iter": it_done, "config": (config or ctx.cfg).to_dict(),
                 "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "format": FORMAT, **meta},
        "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
        "class_stats": prefixed("", ctx.stats.state_dict()) if ctx.stats is not None else None,
        "rng": rng_state(),
        "counters": {"skipped": ctx.skipped.detach().cpu(), **(counters or {})},
    }


def restore(ctx, ckpt: dict, device: torch.device) -> int:
    """Load a ``snapshot`` into ``ctx``; returns the next iteration."""
    ctx.student.load_state_dict(unprefixed("model.", ckpt["state_dict"]))
    if ctx.teacher is not None:
        ema = unprefixed("ema_model.", ckpt["state_dict"])
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
        set_rng_state(ckpt["rng"])
    counters = ckpt.get("counters") or {}
    if "skipped" in counters:
        ctx.skipped.copy_(torch.as_tensor(counters["skipped"]).to(ctx.skipped))
    return int(ckpt["meta"]["iter"])


# ----------------------------------------------------------------------------- writing

def _open_for_writing(path: Path):
    """Opened here so that tests can swap in a file on a full device (/dev/full)."""
    return open(path, "wb")


class _HashingWriter:
    """File wrapper hashing what torch.save writes, so the checksum costs no re-read."""

    def __init__(self, fh):
        self.fh, self.sha = fh, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def _nbytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 16


def _is_disk_full(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 8:  # torch turns the OSError into "unexpected pos ..." (its context)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _write_error(path: Path, exc: BaseException, needed: int) -> CheckpointWriteError:
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = -1
    if _is_disk_full(exc) or 0 <= free < needed:
        return CheckpointWriteError(f"cannot write checkpoint {path}: no space left on its file system (needs about "
                                    f"{needed} bytes = {needed / 2**20:.1f} MiB; {max(free, 0)} bytes free)")
    return CheckpointWriteError(f"cannot write checkpoint {path}: {type(exc).__name__}: {first_line(exc)}")


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _replace_atomically(path: Path, write, needed: int) -> str:
    """Write ``path`` through ``write(fh) -> sha256 hex`` into a temp file, fsync, rename;
    then the ``.sha256`` file the same way. Returns the digest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp(path)
    try:
        with _open_for_writing(tmp) as fh:
            digest = write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        side = path.with_name(path.name + ".sha256")
        side_tmp = _temp(side)
        with open(side_tmp, "w") as fh:
            fh.write(f"{digest}  {path.name}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(side_tmp, side)
    except (OSError, RuntimeError) as exc:
        for t in (tmp, _temp(path.with_name(path.name + ".sha256"))):
            t.unlink(missing_ok=True)
        raise _write_error(path, exc, needed) from None
    return digest


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save to a temp file in the same folder, fsync, rename (atomic on POSIX), plus
    ``<path>.sha256``. A failure removes the temp file and raises CheckpointWriteError."""
    path = Path(path)

    def write(fh) -> str:
        hashing = _HashingWriter(fh)
        torch.save(obj, hashing)
        return hashing.sha.hexdigest()

    _replace_atomically(path, write, _nbytes(obj))
    return path


def _copy_file(src: Path, dst: Path) -> None:
    def write(fh) -> str:
        sha = hashlib.sha256()
        with open(src, "rb") as inp:
            while chunk := inp.read(_CHUNK):
                sha.update(chunk)
                fh.write(chunk)
        return sha.hexdigest()

    _replace_atomically(dst, write, src.stat().st_size)


def save_checkpoint(work_dir: str | os.PathLike, state: dict, it: int, keep: int = 2) -> Path:
    """Write ``iter_<it>.pt`` and its copy ``latest.pt``; keep the newest ``keep`` iter files.

    With a ``meta.run_id`` in ``state`` (the trainer's) only iter files of that run are
    counted and deleted: files of another run, unreadable ones and ones without an id are
    never touched. Without one (direct API use) every iter file of the folder counts."""
    work_dir = Path(work_dir)
    path = atomic_save(state, work_dir / f"iter_{it:06d}.pt")
    _copy_file(path, work_dir / "latest.pt")
    if keep > 0:
        run_id = (state.get("meta") or {}).get("run_id")
        files = iteration_files(work_dir)
        if run_id:
            files = [p for p in files if p == path or run_id_of(p) == run_id]
        for old in files[keep:]:
            old.unlink(missing_ok=True)
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def run_id_of(path: str | os.PathLike) -> str | None:
    """``meta.run_id`` of a checkpoint file (memory-mapped: the tensors are not read), or
    None when it has none or cannot be read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return (ckpt.get("meta") or {}).get("run_id")
    except Exception:  # noqa: BLE001 - damaged or foreign: not provably this run's
        return None


def _digest(path: Path) -> str | None:
    side = path.with_name(path.name + ".sha256")
    return (side.read_text().split() or [None])[0] if side.is_file() else None


def supersede_newer(work_dir: str | os.PathLike, it: int, source: str | os.PathLike | None = None) -> list[Path]:
    """Move ``iter_<t>.pt`` with t > ``it`` (and ``latest.pt`` when it is a copy of one of
    them), each with its ``.sha256``, into ``<work_dir>/superseded/`` (a numbered subfolder
    when names are taken there): after a resume from iteration ``it`` they are another
    history, which ``--resume auto`` (highest number first) and the retention (by number)
    would otherwise take for this run's. Never deletes; never moves ``source``. Returns the
    new paths of the moved checkpoint files."""
    work_dir = Path(work_dir)
    source = Path(source).resolve() if source is not None else None
    newer = [p for p in iteration_files(work_dir) if int(CKPT_RE.match(p.name).group(1)) > it]
    latest = work_dir / "latest.pt"
    if newer and latest.is_file() and _digest(latest) in {_digest(p) for p in newer} - {None}:
        newer.append(latest)
    newer = [p for p in newer if source is None or p.resolve() != source]
    if not newer:
        return []
    dest, n = work_dir / "superseded", 0
    while any((dest / p.name).exists() for p in newer):
        n += 1
        dest = work_dir / "superseded" / str(n)
    dest.mkdir(parents=True, exist_ok=True)
    moved = []
    for p in newer:
        for f in (p, p.with_name(p.name + ".sha256")):
            if f.exists():
                os.replace(f, dest / f.name)
        moved.append(dest / p.name)
    return moved


def remove_stale_temp_files(work_dir: str | os.PathLike) -> list[Path]:
    """Delete temp files a crashed or killed writer left in ``work_dir``; returns them."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return []
    stale = [p for p in work_dir.iterdir() if (m := TEMP_RE.match(p.name)) and int(m.group(1)) != os.getpid()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# ----------------------------------------------------------------------------- reading

def iteration_files(work_dir: str | os.PathLike) -> list[Path]:
    """``iter_<t>.pt`` files of ``work_dir``, newest first."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in work_dir.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def resume_candidates(work_dir: str | os.PathLike) -> list[Path]:
    """What ``--resume auto`` tries, in order: the newest iter file, latest.pt (a copy of
    it), then the older iter files."""
    iters = iteration_files(work_dir)
    latest = Path(work_dir) / "latest.pt"
    return iters[:1] + ([latest] if latest.is_file() else []) + iters[1:]


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read and verify a training checkpoint: checksum (when its ``.sha256`` exists), a
    ``weights_only=True`` load and the expected keys. Raises CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "does not exist")
    side = path.with_name(path.name + ".sha256")
    if side.is_file():
        expected = (side.read_text().split() or [""])[0]
        if _sha256(path) != expected:
            raise CheckpointError(path, f"checksum differs from {side.name} (the file is damaged)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if found is None:  # not a torch file at all, or damaged
            raise CheckpointError(path, "not a loadable checkpoint (UnpicklingError)") from None
        raise CheckpointError(path, f"holds a {found.group(1)} object, which torch.load(weights_only=True) refuses "
                                    "(sepico_fast/1 files pickled numpy's RNG state: load it with "
                                    "weights_only=False only if you trust it, then save it without 'rng')") from None
    except Exception as exc:  # zip and other read errors come in several types
        raise CheckpointError(path, f"not a loadable checkpoint ({type(exc).__name__}: {first_line(exc, 200)})") \
            from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "iter" not in (ckpt.get("meta") or {}):
        raise CheckpointError(path, "not a sepico_fast training checkpoint (no 'state_dict' and 'meta.iter')")
    reason = newer_format_reason(ckpt)
    if reason:
        raise CheckpointFormatError(path, reason)
    return ckpt


def load_newest_intact(work_dir: str | os.PathLike) -> tuple[Path | None, dict | None, list[CheckpointError]]:
    """(path, checkpoint, damaged ones skipped) for ``--resume auto``; (None, None, [...])
    when there is no intact checkpoint (or none at all)."""
    skipped = []
    for path in resume_candidates(work_dir):
        try:
            return path, load_checkpoint(path), skipped
        except CheckpointFormatError:  # intact, only newer: an older file instead would be a silent rollback
            raise
        except CheckpointError as exc:
            skipped.append(exc)
    return None, None, skipped
