"""Host side of one training iteration: aten ops dispatched (per phase) and host time.

On a GPU every non-view aten op is (at least) one kernel launch and costs the host
5-8 µs of Python + dispatcher + launch, whatever the tensor size. Counting them on the
CPU, with the code path a CUDA device would take, predicts how much of a paper-size
iteration is host-bound before any GPU is lent. Method (``count_ops``):

* the iteration is ``train_step`` (fast), the same with ``--compile``'s compiled passes, or
  ``bench/upstream_step.py`` (the authors' dataflow), built as ``bench/step_harness.py``
  builds them: SePiCo after contrast start, DistCL + regulariser, jitter and blur on,
  batch 2+2, projection 512, target images crop × 2·crop; a small crop, because the
  op count does not depend on the pixels (only the per-image Python loops of the
  upstream dataflow depend on the data, as they do on a GPU);
* the CUDA code path is forced on CPU tensors (``cuda_path``): the models' CPU-only
  kernel choices (``models.layout.use_cpu_kernels`` / ``use_cpu_nchw``) are off, the
  contrast ops and class moments take their Triton kernels (run by Triton's interpreter;
  each kernel launch counts as ONE op, whatever the interpreter does inside), the value
  checks take their CUDA branch (``torch._assert_async``: one op, no read), and the
  pixel ops with a CUDA kernel (pseudo label, crop-window scores, ClassMix) count as ONE
  op each (their torch fallback runs, uncounted);
* a ``TorchDispatchMode`` counts every aten op dispatched, forward and backward, except
  views (ops whose schema returns an alias of an input: ``view``, ``t``, ``select``...),
  by the ``train_step`` phase it runs in (``Profiler.phase``);
* ``--compile``: dynamo with a counting backend (AOTAutograd, graphs run eagerly): every
  call of a compiled forward or backward graph counts as one "graph call" and the ops
  inside it are not counted; what is counted is what still runs eagerly around them.
  On a GPU each graph call is as many launches as inductor makes kernels (not known
  without inductor and a GPU).

What it leaves out: the cost of each op (shape computation, allocator, launch: the
meaning of "host time" on the CPU differs, see ``host_time_ms``); Python work that does
not dispatch an op (module calls, autograd bookkeeping: in the host time, not in the
count); the kernels inductor would generate; cuBLAS/cuDNN work-space queries; device
syncs (there are none in the fast step: tests/test_no_host_sync.py).

Host time (``host_time_ms``): process CPU time (and wall time) of one iteration on this CPU with 1 thread, the
same forced path except that the contrast ops and pixel ops run their torch references
(the Triton interpreter would dominate), no dispatch mode; median of a few iterations.
It is an upper bound of the host time on a GPU machine with the same CPU: it includes the
CPU execution of every kernel, which at a small crop is mostly the parameter-sized work
(AdamW, EMA, gradient accumulation over ~85 M parameters for MiT-B5).

    python -m bench.host_ops --arch daformer_mitb5 --mode fast      # one JSON line
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels run on CPU tensors (before triton loads)
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("fast", "compile", "upstream")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    import platform
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def is_view(func) -> bool:
    """True for an aten op whose result aliases an input without writing it (a view)."""
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


class OpCounter(TorchDispatchMode):
    """Counts non-view aten ops by phase; ``suspended()`` hides the ops of an opaque launch."""

    def __init__(self):
        super().__init__()
        self.phase = "other"
        self.by_phase: Counter = Counter()
        self.by_op: Counter = Counter()
        self.sequence: list[tuple] = []
        self.record_sequence = False
        self._hidden = 0

    def add(self, name: str, n: int = 1) -> None:
        if self._hidden == 0:
            self.by_phase[self.phase] += n
            self.by_op[name] += n

    @contextlib.contextmanager
    def suspended(self):
        self._hidden += 1
        try:
            yield
        finally:
            self._hidden -= 1

    @property
    def total(self) -> int:
        return sum(self.by_phase.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._hidden == 0 and not is_view(func):
            name = func.overloadpacket.__name__
            self.add(name)
            if self.record_sequence:
                shapes = tuple(tuple(a.shape) for a in torch.utils._pytree.tree_leaves((args, kwargs))
                               if isinstance(a, torch.Tensor))
                self.sequence.append((str(func), shapes))
        return out


class _PhaseProfiler:
    """Stands in for ``train.profiling.Profiler``: names the counter's current phase."""

    def __init__(self, counter: OpCounter | None):
        self.counter = counter

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.counter is None:
            yield
            return
        before, self.counter.phase = self.counter.phase, name
        try:
            yield
        finally:
            self.counter.phase = before


@contextlib.contextmanager
def cuda_path(counter: OpCounter | None, kernels: bool = True):
    """The code path a CUDA device takes, on CPU tensors (see the module docstring).

    ``kernels``: Triton kernels (interpreted, one op per launch) and the pixel ops as one op
    each; False keeps their torch references (for the host time)."""
    from sepico_fast import ops
    from sepico_fast.contrast import losses, validation
    from sepico_fast.models import heads, mit

    def check_value(cond, message):
        cond = cond.all() if cond.dim() else cond
        torch._assert_async(cond, message)

    patches = [mock.patch.object(mit, "use_cpu_kernels", lambda m, x: False),
               mock.patch.object(heads, "use_cpu_kernels", lambda m, x: False),
               mock.patch.object(heads, "use_cpu_nchw", lambda m, x: False),
               mock.patch.object(validation, "check_value", check_value),
               mock.patch.object(losses, "check_value", check_value)]
    if kernels:
        # the dispatch rule holds its own reference to triton_choice: replace the registered backends
        from sepico_fast import dispatch

        def forced(op, device, dtype=None):
            return "triton", "forced"
        for op in validation.TRITON_OPS:
            patches.append(mock.patch.dict(dispatch._BACKENDS,
                                           {op: dataclasses.replace(dispatch._BACKENDS[op], choose=forced)}))
        for name in ("pseudo_label", "select_crop_windows", "classmix"):
            patches.append(mock.patch.object(ops, name, _opaque(counter, f"sepico_fast::{name}", getattr(ops, name))))
        from triton.runtime import interpreter
        launch = interpreter.GridExecutor.__call__

        def counted_launch(self, *a, **k):
            if counter is None:
                return launch(self, *a, **k)
            counter.add("triton_kernel")
            with counter.suspended():
                return launch(self, *a, **k)

        patches.append(mock.patch.object(interpreter.GridExecutor, "__call__", counted_launch))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def _opaque(counter, name, fn):
    def run(*a, **k):
        # traced into a compiled graph: part of a graph call, never counted on its own (and
        # no guard on the counter's state, which would recompile when the counting starts)
        if counter is None or torch.compiler.is_compiling():
            return fn(*a, **k)
        counter.add(name)
        with counter.suspended():
            return fn(*a, **k)
    return run


def _counting_backend(counter: OpCounter, calls: Counter):
    """AOTAutograd backend whose forward/backward graphs run eagerly, each call counted once."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def wrap(kind):
        def compiler(gm, example_inputs):
            calls[f"{kind}_graphs_compiled"] += 1

            def run(*args):
                calls[f"{kind}_graph_calls"] += 1
                counter.add(f"graph_{kind}")
                with counter.suspended():
                    return gm(*args)
            return make_boxed_func(run)
        return compiler

    return aot_autograd(fw_compiler=wrap("forward"), bw_compiler=wrap("backward"))


def _without_mode(fn):
    from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode_temporarily

    def call(*args, **kwargs):
        if _get_current_dispatch_mode() is None:
            return fn(*args, **kwargs)
        with _pop_mode_temporarily():
            return fn(*args, **kwargs)
    return call


def build(mode: str, arch: str, crop: int, batch: int, counter: OpCounter | None, compile_calls: Counter):
    """(step(it), cfg): the iteration of ``mode`` on synthetic data, CPU tensors."""
    from bench.step_harness import bench_config, synthetic_batches
    from sepico_fast.models import build_segmentor

    device = torch.device("cpu")
    cfg = bench_config(arch, crop, batch)
    torch.manual_seed(cfg.seed)
    student = build_segmentor(cfg.arch, cfg.num_classes, cfg.proj_dim, drop_path_rate=cfg.drop_path_rate).to(device)
    src, tgt = synthetic_batches(batch, crop, device)
    if mode == "upstream":
        from bench.upstream_step import build_upstream_step, upstream_train_step
        u = build_upstream_step(cfg, device, copy.deepcopy(student))
        return (lambda it: upstream_train_step(u, src, tgt, it)), cfg
    from sepico_fast.contrast import ClassStats
    from sepico_fast.train.runner import build_optimizer, compile_step
    from sepico_fast.train.step import StepContext, train_step
    from sepico_fast.train.uda import make_teacher

    ctx = StepContext(cfg=cfg, student=student, teacher=make_teacher(student),
                      optimizer=build_optimizer(cfg, student, device),
                      stats=ClassStats(cfg.num_classes, cfg.proj_dim, device=device), device=device,
                      profiler=_PhaseProfiler(counter))
    if mode == "compile":
        from torch import _dynamo
        _dynamo.reset()
        compile_step(ctx, backend=_counting_backend(counter, compile_calls))
        # dynamo does not run compiled code under a dispatch mode: call the compiled passes
        # with the counter popped (their ops are graph calls; what runs around them is counted)
        for name in ctx.passes.NAMES:
            setattr(ctx.passes, name, _without_mode(getattr(ctx.passes, name)))
    return (lambda it: train_step(ctx, src, tgt, it)), cfg


def count_ops(mode: str, arch: str, crop: int = 64, batch: int = 2, warmup: int = 2) -> dict:
    """Ops of one measured iteration after ``warmup`` ones (lazy state, compilation)."""
    from bench.step_harness import strong_iterations

    counter, calls = OpCounter(), Counter()
    with cuda_path(counter):
        step, cfg = build(mode, arch, crop, batch, counter, calls)
        its = strong_iterations(cfg, warmup + 1)
        for it in its[:-1]:
            with counter.suspended():
                step(it)
        compiled_before = dict(calls)
        calls.clear()
        with counter:
            step(its[-1])
    out = {"mode": mode, "arch": arch, "crop": crop, "batch": batch, "iteration": its[-1],
           "ops": counter.total, "by_phase": dict(counter.by_phase),
           "top_ops": dict(counter.by_op.most_common(12)),
           "ops_by_name": dict(counter.by_op.most_common())}
    if mode == "compile":
        out["graph_calls"] = calls.get("forward_graph_calls", 0) + calls.get("backward_graph_calls", 0)
        out["recompiled_in_measured_iteration"] = (calls.get("forward_graphs_compiled", 0)
                                                   + calls.get("backward_graphs_compiled", 0))
        out["graphs_compiled_in_warmup"] = compiled_before.get("forward_graphs_compiled", 0) + \
            compiled_before.get("backward_graphs_compiled", 0)
    return out


def host_time_ms(mode: str, arch: str, crop: int = 64, batch: int = 2, warmup: int = 2, repeats: int = 5) -> dict:
    """Median wall time of one iteration (1 thread, forced CUDA path, torch references)."""
    from bench.step_harness import strong_iterations

    torch.set_num_threads(1)
    if mode == "compile":
        return {}
    with cuda_path(None, kernels=False):
        step, cfg = build(mode, arch, crop, batch, None, Counter())
        its = strong_iterations(cfg, warmup + repeats)
        times, cpu = [], []
        for it in its:
            t, c = time.perf_counter(), time.process_time()
            step(it)
            times.append((time.perf_counter() - t) * 1e3)
            cpu.append((time.process_time() - c) * 1e3)
    meas = times[warmup:]
    # process CPU time: what this process spent, less sensitive than wall time to other load
    return {"host_ms": statistics.median(cpu[warmup:]), "wall_ms": statistics.median(meas),
            "host_times_ms": [round(t, 1) for t in cpu[warmup:]]}


def subprocess_run(mode: str, arch: str, crop: int = 64, batch: int = 2, timing: bool = True,
                   timeout: float = 3600) -> dict:
    cmd = [sys.executable, "-m", "bench.host_ops", "--mode", mode, "--arch", arch, "--crop", str(crop),
           "--batch", str(batch)] + ([] if timing else ["--no-timing"])
    from bench.step_harness import run_json_process

    return run_json_process(cmd, timeout)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.host_ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, default="fast")
    p.add_argument("--arch", default="daformer_mitb5")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--no-timing", action="store_true", help="only count the ops")
    p.add_argument("--no-count", action="store_true", help="only time the iteration")
    a = p.parse_args(argv)
    out = {"mode": a.mode, "arch": a.arch, "crop": a.crop, "batch": a.batch} if a.no_count else \
        count_ops(a.mode, a.arch, a.crop, a.batch)
    if not a.no_timing:
        out.update(host_time_ms(a.mode, a.arch, a.crop, a.batch))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
