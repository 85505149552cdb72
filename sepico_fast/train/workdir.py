"""One run, one folder: the work dir's lock, its default name, and another run's files.

* ``RunLock``: an exclusive ``fcntl.flock`` on ``<work_dir>/run.lock``, taken before the
  run writes anything there and held for its whole life. The operating system releases it
  when the process ends in any way (an exception, a signal, ``kill -9``, a crash): there is
  no PID file that could outlive its process. The holder writes its pid, host, start time
  and run id into the file, so a second trainer on the folder (or a ``--resume`` of the live
  run) can say in one line who holds it. The file itself stays (an unlocked file means no
  live run).
* ``default_work_dir``: ``work_dirs/<preset>_<method>[_<variant>]_s<seed>_<UTC time>_<6 random
  hex digits>``, created exclusively (a name taken in the meantime is drawn again), so runs
  started in the same second -- two jobs of a sweep, two DDP jobs -- never share a folder.
  Under DDP rank 0 draws it and broadcasts it (``runner._work_dir``).
* ``prior_outputs`` / ``move_aside``: a new run (not a resume) refuses a folder holding
  another run's checkpoints or logs, unless ``--overwrite``, which moves them into
  ``<work_dir>/overwritten_<UTC time>/``; nothing is deleted.

Run ids: each run draws one at its start (``new_run_id``) and keeps it through every
resume; it is stored in the lock file and in every checkpoint's ``meta.run_id``, and the
checkpoint retention (``--keep-checkpoints``) only ever deletes files carrying the current
run's id.
"""
from __future__ import annotations

import datetime
import json
import os
import secrets
import shlex
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the other checks still apply)
    fcntl = None

LOCK_NAME = "run.lock"
# What a run writes into its folder; any of them means the folder holds a run.
OUTPUTS = ("config.json", "metrics.json", "scalars.jsonl", "latest.pt", "curves.png", "pseudo_diagnostics.txt")
OUTPUT_FOLDERS = ("tb", "debug", "profile", "superseded")
ASIDE_PREFIX = "overwritten_"


class WorkDirBusy(Exception):
    """The work dir is locked by a live run; ``str()`` is one line naming the holder."""


def new_run_id() -> str:
    return secrets.token_hex(6)


def utc_stamp(micro: bool = False) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y%m%d_%H%M%S" + ("_%f" if micro else ""))


def default_work_dir(cfg, root: str | os.PathLike = "work_dirs") -> Path:
    """A new, empty folder for ``cfg``'s run (created here, so no other run can take it)."""
    name = f"{cfg.preset}_{cfg.method}" + (f"_{cfg.variant}" if cfg.method == "sepico" else "")
    Path(root).mkdir(parents=True, exist_ok=True)
    while True:
        path = Path(root) / f"{name}_s{cfg.seed}_{utc_stamp()}_{secrets.token_hex(3)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def describe_holder(info: dict) -> str:
    if not info:
        return "a process that has not written its details yet"
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}, "
            f"run id {info.get('run_id', '?')}")


def _read_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


_held: dict[str, "RunLock"] = {}  # the locks this process holds, by folder


class RunLock:
    """The exclusive lock on a work dir; ``release()`` (or the process's end) frees it."""

    def __init__(self, work_dir: Path, fh):
        self.work_dir, self.fh = work_dir, fh

    @classmethod
    def acquire(cls, work_dir: str | os.PathLike, run_id: str) -> "RunLock":
        """Lock ``work_dir`` (an existing folder) for this process, or raise WorkDirBusy."""
        work_dir = Path(work_dir)
        key = str(work_dir.resolve())
        if key in _held:  # this process's earlier run there (Python API): that one is over
            _held.pop(key).release()
        path = work_dir / LOCK_NAME
        fh = open(path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                raise WorkDirBusy(describe_holder(_read_info(path))) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "run_id": run_id}
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(info) + "\n")
        fh.flush()
        lock = cls(work_dir, fh)
        _held[key] = lock
        return lock

    def release(self) -> None:
        if self.fh is None:
            return
        if fcntl is not None:
            try:
                fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            except OSError:
                pass
        self.fh.close()
        self.fh = None
        key = str(self.work_dir.resolve())
        if _held.get(key) is self:
            del _held[key]


def release_all() -> None:
    """Release every work-dir lock this process holds (the end of ``runner.run``)."""
    for lock in list(_held.values()):
        lock.release()


def prior_outputs(work_dir: str | os.PathLike) -> list[str]:
    """Names of another run's files and folders in ``work_dir`` (checkpoints first)."""
    from .run_checkpoints import iteration_files

    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return []
    found = [p.name for p in iteration_files(work_dir)]
    found += [n for n in OUTPUTS if (work_dir / n).exists()]
    found += [n + "/" for n in OUTPUT_FOLDERS if (work_dir / n).is_dir()]
    return found


def move_aside(work_dir: str | os.PathLike) -> Path:
    """Move every entry of ``work_dir`` but the lock and earlier set-aside folders into a new
    ``overwritten_<UTC time>/`` subfolder; returns it. Never deletes."""
    work_dir = Path(work_dir)
    dest = work_dir / f"{ASIDE_PREFIX}{utc_stamp(micro=True)}"
    dest.mkdir()
    for p in sorted(work_dir.iterdir()):
        if p == dest or p.name == LOCK_NAME or p.name.startswith(ASIDE_PREFIX):
            continue
        os.replace(p, dest / p.name)
    return dest


def refusal(work_dir: Path, found: list[str]) -> str:
    """The one line a new run prints for a folder holding another run's files."""
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    q = shlex.quote(str(work_dir))
    return (f"--work-dir: {work_dir} holds another run ({shown}); continue it with --resume auto --work-dir {q}, "
            f"give a new --work-dir, or add --overwrite to move its files aside into "
            f"{work_dir / (ASIDE_PREFIX + '<UTC time>')} (nothing is deleted)")
