"""Console progress bar with ETA, scalar logs (TensorBoard if importable, JSONL always).
TensorBoard is optional (the ``tb`` extra); a run without it says so in one line. (IoU
tables: ``sepico_fast.reporting``.)
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """``[#####.....] 120/600 20% | 00:31<02:04 | 3.9 it/s 7.8 img/s | loss ...``.

    Redraws one line on a terminal; prints one line per update otherwise (logs, CI).
    """

    def __init__(self, total: int, start: int = 0, width: int = 24, stream=None):
        self.total, self.start, self.width = total, start, width
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, it: int, text: str = "") -> str:
        done = it - self.start
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed if elapsed > 0 and done > 0 else float("nan")
        eta = (self.total - it) / rate if rate == rate and rate > 0 else float("nan")
        frac = it / self.total if self.total else 1.0
        filled = int(round(self.width * frac))
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {it}/{self.total} {100 * frac:3.0f}% | "
                f"{format_duration(elapsed)}<{format_duration(eta)} | {text}")
        if self.tty:
            self.stream.write("\r\033[K" + line)
            if it >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return line

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def truncate_scalars(log_dir: str | Path, it: int) -> int:
    """Keep the rows of ``scalars.jsonl`` up to iteration ``it`` (a resume from ``it``: later
    rows were logged by the continuation it abandons and would repeat); the rows taken out
    are appended to ``superseded/scalars.jsonl``. Returns their number."""
    path = Path(log_dir) / "scalars.jsonl"
    if not path.is_file():
        return 0
    keep, drop = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row_it = json.loads(line).get("iter", 0)
        except (ValueError, AttributeError):  # a row cut by a kill: not kept
            row_it = it + 1
        (drop if row_it > it else keep).append(line if line.endswith("\n") else line + "\n")
    if not drop:
        return 0
    aside = path.parent / "superseded" / "scalars.jsonl"
    aside.parent.mkdir(parents=True, exist_ok=True)
    with open(aside, "a") as fh:
        fh.writelines(drop)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)
    return len(drop)


class ScalarWriter:
    """Scalars to ``scalars.jsonl`` (always) and TensorBoard (when importable)."""

    def __init__(self, log_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.log_dir / "scalars.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional
            self._tb = SummaryWriter(str(self.log_dir / "tb"))
        except Exception as err:  # tensorboard missing or broken: JSONL only, said once
            self._tb = None
            print(f"scalars: {self.log_dir / 'scalars.jsonl'} only, no TensorBoard "
                  f"({type(err).__name__}: {err}; pip install tensorboard, or the [tb] extra)")

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def write(self, it: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"iter": it, **scalars}) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, it)

    def close(self):
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()

