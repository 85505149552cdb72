"""Per-phase instrumentation: NVTX ranges, torch.profiler trace, phase time table.

``Profiler.phase(name)`` is a context manager used around each phase of the step
(data, ema, teacher, stats, student_source, student_target, mix, optimizer). When both
``--profile`` and ``--nvtx`` are off it returns one shared ``nullcontext``: no cost.

* ``--nvtx``: ``torch.cuda.nvtx.range_push/pop`` named after the phase (Nsight Systems);
  ignored with a warning without CUDA.
* ``--profile``: the first ``profile_iters`` iterations after a short warm-up run under
  ``torch.profiler`` (trace written to ``<work_dir>/profile/trace.json``) and each phase
  is timed with a device synchronisation at its boundaries (only while profiling), giving
  the per-phase table printed at the end and written to ``profile/phases.txt``.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from pathlib import Path

import torch

_NULL = contextlib.nullcontext()


class Profiler:
    def __init__(self, *, profile: bool, nvtx: bool, device: torch.device, out_dir: str | Path,
                 iters: int = 10, warmup: int = 2):
        self.device = torch.device(device)
        self.nvtx = bool(nvtx) and torch.cuda.is_available() and self.device.type == "cuda"
        if nvtx and not self.nvtx:
            print("[profiling] --nvtx needs a CUDA device; NVTX ranges disabled")
        self.want_profile = bool(profile)
        self.out_dir = Path(out_dir)
        self.warmup, self.iters = warmup, iters
        self.active = False      # inside the recorded window
        self._torch_prof = None
        self._seen = 0
        self.times = defaultdict(float)
        self.calls = defaultdict(int)

    @property
    def enabled(self) -> bool:
        return self.nvtx or self.active

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def _range(self, name: str):
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        rec = torch.profiler.record_function(name) if self.active else _NULL
        if self.active:
            self._sync()
            t0 = time.perf_counter()
        try:
            with rec:
                yield
        finally:
            if self.active:
                self._sync()
                self.times[name] += time.perf_counter() - t0
                self.calls[name] += 1
            if self.nvtx:
                torch.cuda.nvtx.range_pop()

    def phase(self, name: str):
        return self._range(name) if self.enabled else _NULL

    def step(self) -> None:
        """Call once per iteration, after it."""
        if not self.want_profile:
            return
        self._seen += 1
        if self._seen == self.warmup and self._torch_prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._torch_prof = torch.profiler.profile(activities=acts, record_shapes=False)
            self._torch_prof.__enter__()
            self.active = True
        elif self.active and self._seen >= self.warmup + self.iters:
            self.finish()

    def finish(self) -> str | None:
        if self._torch_prof is None or not self.active:
            return None
        self._sync()
        self._torch_prof.__exit__(None, None, None)
        self.active = False
        self.want_profile = False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._torch_prof.export_chrome_trace(str(self.out_dir / "trace.json"))
        table = self.table()
        (self.out_dir / "phases.txt").write_text(table + "\n")
        print(table)
        print(f"[profiling] trace written to {self.out_dir / 'trace.json'}")
        return table

    def table(self) -> str:
        total = sum(self.times.values()) or 1.0
        lines = [f"{'phase':<16}{'calls':>7}{'ms/call':>10}{'share':>8}"]
        for name, secs in sorted(self.times.items(), key=lambda kv: -kv[1]):
            n = self.calls[name]
            lines.append(f"{name:<16}{n:>7}{1e3 * secs / max(n, 1):>10.2f}{100 * secs / total:>7.1f}%")
        return "\n".join(lines)
