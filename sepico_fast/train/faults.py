"""What the training loop does when something stops it early: nothing trained is lost.

* SIGINT / SIGTERM (Ctrl-C, ``kill``, a cluster preempting the job, torchrun stopping its
  workers): ``StopOnSignal`` only records the signal; the loop finishes the iteration it is
  in, writes a checkpoint of it and stops with exit status 128 + signal (130, 143). A
  second signal stops at once, without a checkpoint -- unless it comes within
  ``DUPLICATE_S`` seconds of the first (torchrun forwards the signal it got to its
  workers, and a terminal's Ctrl-C or Slurm's scancel signal the agent and the workers
  alike, so each worker gets the same request twice) or once the stop is under way: from
  the agreed stop to the exit (the emergency checkpoint, the wait for rank 0) further
  signals are only counted. Under DDP the ranks agree on the iteration to stop after
  (one tiny all-reduce over a gloo group per iteration, on the host: no device sync), and
  after an agreed stop the other ranks wait on that group for rank 0 to finish writing
  its checkpoint (at most ``--ddp-timeout``) before they exit: torchrun stops every
  worker once one has exited.
* An exception: ``emergency_stop`` writes an emergency checkpoint of the last completed
  iteration (rank 0), then turns a known fault (bad data file, NaN limit, full disk) into
  ``RunStopped`` — one line naming the fault and the checkpoint — and re-raises anything
  else with its traceback after one line saying where the checkpoint is. When the
  exception came from inside ``train_step`` the teacher EMA and the class statistics may
  already include part of that iteration: the checkpoint says so (``meta.emergency``) and
  a resume from it is close to, but not bitwise, the uninterrupted run.
"""
from __future__ import annotations

import shlex
import signal
import sys
import threading
import time

import torch

from ..data.io import DataFileError
from ..reporting import first_line
from . import run_checkpoints


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


# A second signal this soon after the first is the same request delivered twice (seconds).
DUPLICATE_S = 2.0


class StopOnSignal:
    """Context manager: SIGINT/SIGTERM set a flag that ``requested()`` reports (agreed over ranks)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, control_group=None, world_size: int = 1):
        self.group, self.world_size = control_group, world_size
        self.signum: int | None = None
        self.forced = False
        self.stopping = False   # the stop is under way: later signals are only counted
        self.ignored = 0        # signals counted, not acted on
        self._first_at = 0.0
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            return
        if self.stopping or now - self._first_at < DUPLICATE_S:
            self.ignored += 1
            return
        self.forced = True  # a second request, well after the first: stop now
        raise KeyboardInterrupt

    def shield(self) -> None:
        """From now on signals never raise (the emergency checkpoint is being written)."""
        self.stopping = True

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
            self.signum, self._first_at = int(flag.item()), time.monotonic()
        return bool(flag.item())

    def wait_for_rank0(self) -> str:
        """After a stop every rank agreed on: block until every rank, rank 0 after its
        checkpoint, gets here (at most the group's ``--ddp-timeout``). "" or why not."""
        if self.world_size <= 1 or self.group is None:
            return ""
        import torch.distributed as dist

        try:
            dist.barrier(group=self.group)
        except Exception as exc:  # noqa: BLE001 - a timeout or a rank that died: say so, keep going
            return f"; did not see every rank finish ({first_line(exc)})"
        return ""


# Stops every rank reaches at the same iteration (the signal flag and the skipped-step
# counter are agreed over the ranks): only then may the ranks wait for each other.
AGREED_STOPS = (Interrupted, NonFiniteLimit)


def _save(run, reason: str) -> tuple[str, bool]:
    """(where the state after ``run.done`` iterations is, whether it was written now)."""
    if run.done <= run.start_it and run.saved_at is not None:
        return f"nothing new since {run.saved_at}", False
    if run.done == 0:
        return "no iteration completed, nothing to save", False
    if run.saved_at == run.done:
        return f"checkpoint of iteration {run.done}: {run.work_dir / f'iter_{run.done:06d}.pt'}", False
    if not run.main:
        return "the checkpoint is written by rank 0", False
    extra = {"emergency": {"reason": reason, "partial_step": bool(run.in_step)}}
    path = run_checkpoints.save_checkpoint(run.work_dir, run.snapshot(run.done, **extra), run.done, run.cfg.keep_checkpoints)
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
    if stop is not None:
        stop.shield()  # a signal now (torchrun passing one on, stopping the workers) must not cut the save
    resume = f"resume with --resume auto --work-dir {shlex.quote(str(run.work_dir))}"
    if isinstance(exc, run_checkpoints.CheckpointWriteError):
        return RunStopped(f"error: {exc}; free space and {resume}", 1)
    reason = f"{type(exc).__name__}: {first_line(exc)}"
    try:
        where, _ = _save(run, reason)
    except BaseException as save_exc:  # noqa: BLE001 - report both, keep the original
        where = f"the emergency checkpoint failed too ({type(save_exc).__name__}: {first_line(save_exc)})"
        # Not "resume": the iterations since the last checkpoint are lost, say what is left.
        last = (f"the newest checkpoint is of iteration {run.saved_at} in {shlex.quote(str(run.work_dir))}"
                if run.saved_at else "no checkpoint of this run was written")
        resume = f"the iterations after {run.saved_at or 0} are not saved; {last}"
    if stop is not None and isinstance(exc, AGREED_STOPS):
        where += stop.wait_for_rank0()
    if isinstance(exc, Interrupted):
        return RunStopped(f"stopped by {exc}: {where}; {resume}", 128 + exc.signum)
    if isinstance(exc, KeyboardInterrupt):
        return RunStopped(f"stopped by SIGINT: {where}; {resume}", 130)
    if isinstance(exc, DataFileError):
        return RunStopped(f"error: {exc} ({where}; fix or remove the file, then {resume})"
                          if resume.startswith("resume") else f"error: {exc} ({where}; {resume})", 1)
    if isinstance(exc, NonFiniteLimit):
        return RunStopped(f"error: {exc} ({where})", 1)
    if run.main:
        print(f"sepico_fast.train: {reason.split(':')[0]} after iteration {run.done}; {where}", file=sys.stderr)
    return exc
