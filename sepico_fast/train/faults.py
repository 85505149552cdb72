"""What the training loop does when something stops it early: nothing trained is lost.

* SIGINT / SIGTERM (Ctrl-C, ``kill``, a cluster preempting the job, torchrun stopping its
  workers): ``StopOnSignal`` only records the signal; the loop finishes the iteration it is
  in, writes a checkpoint of it and stops with exit status 128 + signal (130, 143). A
  second signal stops at once, without a checkpoint. Under DDP the ranks agree on the
  iteration to stop after (one tiny all-reduce over a gloo group per iteration, on the
  host: no device sync), so rank 0's checkpoint never waits for a rank that stopped.
* An exception: ``emergency_stop`` writes an emergency checkpoint of the last completed
  iteration (rank 0), then turns a known fault (bad data file, NaN limit, full disk) into
  ``RunStopped`` — one line naming the fault and the checkpoint — and re-raises anything
  else with its traceback after one line saying where the checkpoint is. When the
  exception came from inside ``train_step`` the teacher EMA and the class statistics may
  already include part of that iteration: the checkpoint says so (``meta.emergency``) and
  a resume from it is close to, but not bitwise, the uninterrupted run.
"""
from __future__ import annotations

import signal
import sys
import threading

import torch

from ..data.io import DataFileError
from . import checkpointing as ckpt_io


class RunStopped(Exception):
    """Training stopped early for a known reason; ``str()`` is one line, ``exit_code`` the status."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteLimit(RuntimeError):
    """More optimizer steps were skipped for NaN/Inf than ``--max-skipped-steps`` allows."""


class Interrupted(Exception):
    """A SIGINT/SIGTERM the loop acted on after finishing an iteration."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnSignal:
    """Context manager: SIGINT/SIGTERM set a flag that ``requested()`` reports (agreed over ranks)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, control_group=None, world_size: int = 1):
        self.group, self.world_size = control_group, world_size
        self.signum: int | None = None
        self.forced = False
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:  # the second one: stop now
            self.forced = True
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def requested(self) -> bool:
        """Whether to stop after this iteration; under DDP true on every rank once any rank got a signal."""
        if self.world_size <= 1 or self.group is None:
            return self.signum is not None
        import torch.distributed as dist

        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())


def _save(run, reason: str) -> tuple[str, bool]:
    """(where the state after ``run.done`` iterations is, whether it was written now)."""
    if run.done <= run.start_it and run.saved_at is not None:
        return f"nothing new since {run.saved_at}", False
    if run.done == 0:
        return "no iteration completed, nothing to save", False
    if run.saved_at == run.done:
        return f"checkpoint of iteration {run.done}: {run.work_dir / f'iter_{run.done:06d}.pt'}", False
    if not run.main:
        return "checkpoints are written by rank 0", False
    extra = {"emergency": {"reason": reason, "partial_step": bool(run.in_step)}}
    path = ckpt_io.save_checkpoint(run.work_dir, ckpt_io.snapshot(run.ctx, run.done, config=run.requested_cfg, **extra), run.done,
                                   run.cfg.keep_checkpoints)
    run.saved_at = run.done
    note = " (taken inside the next iteration: teacher and class statistics may include part of it)" \
        if run.in_step else ""
    return f"emergency checkpoint of iteration {run.done}: {path}{note}", True


def emergency_stop(run, exc: BaseException) -> BaseException:
    """The exception to raise after ``exc`` stopped the loop, an emergency checkpoint written."""
    out = _emergency_stop(run, exc)
    if isinstance(out, RunStopped) and run.dist_info.world_size > 1:
        out = RunStopped(f"rank {run.dist_info.rank}: {out}", out.exit_code)
    return out


def _emergency_stop(run, exc: BaseException) -> BaseException:
    stop = getattr(run, "stop", None)
    if isinstance(exc, KeyboardInterrupt) and stop is not None and stop.forced:
        return RunStopped(f"stopped by a second signal inside iteration {run.done + 1}; no checkpoint written "
                          f"(the last one: {run.saved_at if run.saved_at is not None else 'none'})", 130)
    resume = f"resume with --resume auto --work-dir {run.work_dir}"
    if isinstance(exc, ckpt_io.CheckpointWriteError):
        return RunStopped(f"error: {exc}; free space and {resume}", 1)
    reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    try:
        where, _ = _save(run, reason)
    except Exception as save_exc:  # noqa: BLE001 - report both, keep the original
        where = f"the emergency checkpoint failed too ({save_exc})"
    if isinstance(exc, Interrupted):
        return RunStopped(f"stopped by {exc}: {where}; {resume}", 128 + exc.signum)
    if isinstance(exc, KeyboardInterrupt):
        return RunStopped(f"stopped by SIGINT: {where}; {resume}", 130)
    if isinstance(exc, DataFileError):
        return RunStopped(f"error: {exc} ({where}; fix or remove the file, then {resume})", 1)
    if isinstance(exc, NonFiniteLimit):
        return RunStopped(f"error: {exc} ({where})", 1)
    if run.main:
        print(f"sepico_fast.train: {reason.split(':')[0]} after iteration {run.done}; {where}", file=sys.stderr)
    return exc
