"""``train_step`` never waits for the device: no host→device copy, no device→host read.

On the CPU the "device" is the host, so a sync cannot be observed directly. The probe
below instead tracks where every tensor lives *as if the step ran on a GPU*:

* every tensor the step starts from (models, optimizer state, statistics, the batch, the
  per-device constants of ``augment``) is a DEVICE tensor, and so is every result of an
  op with a DEVICE input or of a factory op given an explicit ``device=``;
* a tensor built on the host — ``torch.tensor`` / ``as_tensor`` of Python data
  (``aten::lift_fresh``) or a factory op without ``device=`` — is a HOST tensor.

It fails on every host→device transfer (``torch.tensor(data, device=...)``,
``.to(device)`` / ``.cuda()`` / ``copy_`` of a HOST tensor, a HOST tensor of more than
one element fed to a DEVICE op), on every device→host read of a DEVICE tensor
(``aten::_local_scalar_dense`` = ``.item()`` / ``bool()`` / ``int()`` / ``float()``,
``.tolist()``, ``.numpy()``, ``.cpu()``, ``aten::equal``) and on every op whose output
shape depends on the data (``nonzero``, ``masked_select``, boolean indexing, ``unique``,
``repeat_interleave`` without ``output_size``, ``bincount``, ``histc``), and on a tensor
that appears out of nowhere (created before the step and not known as device state, e.g.
a module-level CPU constant moved with ``.to``, which is a no-op on the CPU).

HOST scalars (0-d) as operands of DEVICE ops are allowed: CUDA reads them on the host
as kernel arguments, without a copy (that is how ``x[i:j] = 0.5`` works).

Before the fix this caught, per iteration: ``torch.tensor(IMAGENET_MEAN/STD, device=...)``
in ``augment._mean_std`` (twice per de-/re-normalisation), the HSV sector table in
``augment.hsv_to_rgb`` and ``torch.as_tensor(sigmas).to(device)`` in
``augment.gaussian_blur`` — about 18 synchronising copies per iteration on CUDA.

One exception, by design: ``contrast.validation.check_value`` evaluates its condition
eagerly only on the CPU (on CUDA it queues ``torch._assert_async``); its CPU branch is
allowed here. On a GPU the same steps run under ``torch.cuda.set_sync_debug_mode("error")``,
which sees the real branch (``test_no_host_sync_cuda``).
"""
from __future__ import annotations

import sys
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

from sepico_fast.contrast import ClassStats, validation
from sepico_fast.models import build_segmentor
from sepico_fast.train.config import make_config
from sepico_fast.train.pseudo_diagnostics import PseudoDiagnostics
from sepico_fast.train.runner import build_optimizer
from sepico_fast.train.step import StepContext, train_step
from sepico_fast.train.uda import log_frequency_class_weights, make_teacher

C, A = 19, 16
DEVICE, HOST = "device", "host"

# Ops whose output shape depends on tensor values (the host must read it) or that return
# a Python value computed from the data.
_DATA_DEPENDENT = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                   "unique_dim_consecutive", "bincount", "histc", "equal", "is_nonzero", "argwhere",
                   "_local_scalar_dense"}
# Factory functions: without ``device=`` they build on the host (dispatch fills in the default).
_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.arange, torch.rand, torch.randn,
              torch.randint, torch.randperm, torch.linspace, torch.logspace, torch.eye, torch.scalar_tensor,
              torch.empty_strided, torch.normal}
_CREATE_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.from_numpy, torch.Tensor.new_tensor}
_READS = {torch.Tensor.tolist: ".tolist()", torch.Tensor.numpy: ".numpy()", torch.Tensor.__array__: "__array__",
          torch.Tensor.cpu: ".cpu()"}


def _where() -> str:
    """The innermost project frame (file:line function) of the current Python stack."""
    for frame in reversed(traceback.extract_stack()):
        if "/sepico_fast/" in frame.filename or "/kernels/" in frame.filename:
            return f"{frame.filename.split('/')[-1]}:{frame.lineno} {frame.name}"
    return "?"


def _in_check_value() -> bool:
    code = validation.check_value.__code__
    f = sys._getframe()
    while f is not None:
        if f.f_code is code:
            return True
        f = f.f_back
    return False


def _tensors(tree):
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class _Colors:
    def __init__(self):
        self.of = WeakTensorKeyDictionary()
        self.violations: list[str] = []
        self.strict = False

    def flag(self, what: str) -> None:
        if self.strict:
            self.violations.append(f"{what}  [{_where()}]")


class _Dispatch(TorchDispatchMode):
    def __init__(self, colors: _Colors):
        super().__init__()
        self.c = colors

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c, name = self.c, func.overloadpacket.__name__
        if name in ("lift_fresh", "lift_fresh_copy"):  # torch.tensor(python data): built on the host
            out = func(*args, **kwargs)
            c.of[out] = HOST
            return out
        ins = _tensors((args, kwargs))
        colors = [c.of.get(t) for t in ins]
        if None in colors:
            t = ins[colors.index(None)]
            c.flag(f"{func}: input {tuple(t.shape)} {t.dtype} was created outside the step and is not "
                   "known device state (a module-level constant?)")
            colors = [DEVICE if k is None else k for k in colors]
        on_device = DEVICE in colors
        if on_device:
            if name in _DATA_DEPENDENT and not (name == "_local_scalar_dense" and _in_check_value()):
                c.flag(f"{func}: device->host read / data-dependent shape")
            if name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                    t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1])):
                c.flag(f"{func}: boolean-mask indexing (nonzero: host sync)")
            if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) > 0 \
                    and isinstance(args[-1] if len(args) > 1 else None, torch.Tensor):
                c.flag(f"{func}: repeat_interleave with tensor repeats and no output_size")
            for t, k in zip(ins, colors):
                if k == HOST and (t.dim() > 0 or name in ("copy_", "_to_copy", "_copy_from")):
                    c.flag(f"{func}: host tensor {tuple(t.shape)} {t.dtype} used on the device (H2D copy)")
        out = func(*args, **kwargs)
        if on_device:
            color = DEVICE
        elif ins:
            color = HOST
        else:  # factory op; the function mode marks host factories (no device=) HOST
            color = DEVICE
        for t in _tensors(out):
            c.of[t] = color
        return out


class _Function(TorchFunctionMode):
    def __init__(self, colors: _Colors):
        super().__init__()
        self.c = colors

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        if func in _READS and args and c.of.get(args[0]) == DEVICE:
            c.flag(f"{_READS[func]} of a device tensor (device->host read)")
        out = func(*args, **kwargs)
        if func in _FACTORIES and kwargs.get("device") is None and isinstance(out, torch.Tensor):
            c.of[out] = HOST
        elif func in _CREATE_FROM_DATA:
            data_is_tensor = bool(args) and isinstance(args[0], torch.Tensor)
            src = c.of.get(args[0], DEVICE) if data_is_tensor else HOST
            if kwargs.get("device") is not None:
                if src == HOST:
                    c.flag(f"{func.__name__}(host data, device=...) (H2D copy)")
                c.of[out] = DEVICE
            elif not data_is_tensor and func is not torch.Tensor.new_tensor:
                c.of[out] = HOST
        elif func in (torch.Tensor.to, torch.Tensor.cuda) and isinstance(out, torch.Tensor):
            target = kwargs.get("device")
            for a in args[1:]:
                if isinstance(a, (torch.device, str)):
                    target = a
                elif isinstance(a, torch.Tensor):
                    target = a.device if c.of.get(a) == DEVICE else "cpu"
            if func is torch.Tensor.cuda:
                target = "cuda"
            src = c.of.get(args[0])
            if target is not None and src == HOST and target != "cpu":
                c.flag(f"Tensor.{func.__name__}(device) of a host tensor (H2D copy)")
                c.of[out] = DEVICE
            elif target == "cpu" and src == DEVICE:
                c.flag("Tensor.to('cpu') of a device tensor (device->host read)")
        return out


class HostSyncProbe:
    """``with HostSyncProbe(state) as probe:`` … ``probe.violations``; ``probe.strict`` off
    records where tensors live without complaining (the warm-up iteration)."""

    def __init__(self, *device_state):
        self.colors = _Colors()
        for t in _collect(device_state):
            self.colors.of[t] = DEVICE

    @property
    def violations(self):
        return self.colors.violations

    def strict(self, on: bool) -> None:
        self.colors.strict = on

    def __enter__(self):
        self._fn, self._disp = _Function(self.colors), _Dispatch(self.colors)
        self._fn.__enter__()
        self._disp.__enter__()
        return self

    def __exit__(self, *exc):
        self._disp.__exit__(*exc)
        self._fn.__exit__(*exc)


def _collect(obj, seen=None, depth=0):
    """Every tensor reachable from obj (modules, optimizers, dataclasses, containers)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj] + ([obj.grad] if obj.grad is not None else [])
    if isinstance(obj, torch.nn.Module):
        return [t for t in obj.state_dict(keep_vars=True).values()]
    if isinstance(obj, torch.optim.Optimizer):
        return _collect(list(obj.state.values()), seen, depth + 1)
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _collect(v, seen, depth + 1)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _collect(v, seen, depth + 1)]
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith(("sepico_fast", "torch.amp")):
        return _collect(vars(obj), seen, depth + 1)
    return []


# ---------------------------------------------------------------------------------------
# The steps probed
# ---------------------------------------------------------------------------------------
CASES = {
    "dist": dict(variant="dist"),
    "bank": dict(variant="bank"),
    "proto": dict(variant="proto"),
    "dark_zurich": dict(variant="dist", source="cityscapes", target="darkzurich"),
    "source_only": dict(method="source_only"),
    "fp16_scaler": dict(variant="dist"),
    # --pseudo-diagnostics: counts with index_put_(accumulate=True) on the device
    "pseudo_diagnostics": dict(variant="dist", pseudo_diagnostics=True),
}


def _context(case: str, device: torch.device):
    over = dict(arch="daformer_tiny", crop=[32, 32], iters=10, warmup_iters=2, contrast_start=2, proj_dim=A,
                memory_length=3,
                color_jitter_p=0.0, seed=5, pseudo_threshold=0.05, pseudo_ignore_top=40, pseudo_ignore_bottom=40)
    over.update(CASES[case])
    cfg = make_config(over)
    torch.manual_seed(0)
    student = build_segmentor(cfg.arch, C, A, drop_path_rate=0.1).to(device)
    sepico = cfg.method == "sepico"
    amp_dtype, scaler = (torch.float16, torch.amp.GradScaler(device.type)) if case == "fp16_scaler" else (None, None)
    ctx = StepContext(cfg=cfg, student=student, teacher=make_teacher(student) if sepico else None,
                      optimizer=build_optimizer(cfg, student, device),
                      stats=ClassStats(C, A, cfg.memory_length if cfg.variant == "bank" else 0, device=device)
                      if sepico else None,
                      device=device, amp_dtype=amp_dtype, scaler=scaler,
                      class_weight=log_frequency_class_weights().to(device) if cfg.dark_zurich else None)
    if cfg.pseudo_diagnostics:
        ctx.pseudo_diag = PseudoDiagnostics(C, cfg.pseudo_threshold, device, cfg.ignore_rows())
    return ctx


def _batches(device: torch.device, dark_zurich: bool, target_labels: bool = False):
    g = torch.Generator().manual_seed(1)
    gt = torch.randint(0, 6, (2, 1, 8, 8), generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
    gt[0, :, :4, :4] = 255
    src = {"img": torch.randn(2, 3, 32, 32, generator=g), "gt": gt}
    tgt = {"img": torch.randn(2, 3, 32, 48, generator=g)}
    if dark_zurich:
        tgt["ref_img"] = torch.randn(2, 3, 32, 48, generator=g)
    if target_labels:  # the target crop's labels, for --pseudo-diagnostics
        tgt["gt"] = torch.randint(0, 6, (2, 1, 32, 48), generator=g)
        tgt["gt"][1, :, :8] = 255
    move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return move(src), move(tgt)


def _device_constants(device):
    """augment's per-device constants: built once, on the device, by construction."""
    from sepico_fast import augment
    return augment.device_constants(device)


def probe_steps(case: str, iterations=(2,), debug: bool = False) -> list[str]:
    """Violations of the given iterations (contrast starts at 2), probed from the first one
    on: lazy state (optimizer moments, GradScaler scale) is built on the device too."""
    device = torch.device("cpu")
    ctx = _context(case, device)
    src, tgt = _batches(device, ctx.cfg.dark_zurich, ctx.cfg.pseudo_diagnostics)
    with HostSyncProbe(ctx, src, tgt, _device_constants(device)) as probe:
        probe.strict(True)
        for it in iterations:
            out = train_step(ctx, src, tgt, it, debug=debug)
    assert "tgt_contrast" in out["losses"] or ctx.cfg.method == "source_only" or iterations[-1] < 2
    if ctx.pseudo_diag is not None:  # the counting path really ran
        assert int(ctx.pseudo_diag.counts[0, :-1].sum()) > 0
    return probe.violations


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_step_has_no_host_sync(case):
    """One iteration after contrast start (the other iterations run a subset of its code)."""
    bad = probe_steps(case)
    assert not bad, "host syncs in train_step:\n" + "\n".join(sorted(set(bad)))


def test_first_iterations_and_debug_outputs_have_no_host_sync():
    """Iteration 0 (teacher copy, lazy optimizer state), 1 (before contrast start) and 2
    with the debug outputs."""
    bad = probe_steps("dist", iterations=(0, 1), debug=False) + probe_steps("dist", debug=True)
    assert not bad, "host syncs in train_step:\n" + "\n".join(sorted(set(bad)))


# ---------------------------------------------------------------------------------------
# The probe itself catches each kind of sync (so a green test means something)
# ---------------------------------------------------------------------------------------
_MODULE_CONSTANT = torch.arange(3.0)


@pytest.mark.parametrize("snippet, expected", [
    (lambda x: torch.tensor([1.0, 2.0], device=x.device), "H2D"),
    (lambda x: x + torch.as_tensor([1.0, 2.0, 3.0]).to(x.device), "H2D"),
    (lambda x: x + torch.arange(3.0), "H2D"),
    (lambda x: x + _MODULE_CONSTANT.to(x.device), "outside the step"),
    (lambda x: x.sum().item(), "_local_scalar_dense"),
    (lambda x: bool(x.sum() > 0), "_local_scalar_dense"),
    (lambda x: x.tolist(), ".tolist()"),
    (lambda x: x.cpu(), ".cpu()"),
    (lambda x: x[x > 0], "boolean-mask"),
    (lambda x: torch.nonzero(x), "nonzero"),
    (lambda x: torch.unique(x), "unique"),
    (lambda x: x.new_zeros(3).copy_(torch.ones(3)), "H2D"),
])
def test_probe_catches(snippet, expected):
    x = torch.randn(3)
    with HostSyncProbe(x) as probe:
        probe.strict(True)
        snippet(x)
    assert any(expected in v for v in probe.violations), probe.violations


def test_probe_allows_device_work():
    x = torch.randn(3)
    with HostSyncProbe(x) as probe:
        probe.strict(True)
        y = torch.where(x > 0, x, 0.5) * 2 + torch.zeros(3, device=x.device)
        y[0:1] = 1.0
        torch.rand(3, device=x.device).argsort().float().mean()
        validation.check_value(torch.isfinite(y), "finite")  # CPU branch of a CUDA-async check
    assert probe.violations == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (sync debug mode)")
@pytest.mark.parametrize("case", sorted(CASES))
def test_no_host_sync_cuda(case):
    """Iterations 0 and 2 warm up (lazy state, Triton compilation and autotuning, the
    extension); then 1 (before contrast start), 3 and 4 (after, 4 with debug outputs) run
    with every synchronising CUDA call turned into an error."""
    device = torch.device("cuda")
    ctx = _context(case, device)
    src, tgt = _batches(device, ctx.cfg.dark_zurich, ctx.cfg.pseudo_diagnostics)
    for it in (0, 2):
        train_step(ctx, src, tgt, it)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for it in (1, 3, 4):
            train_step(ctx, src, tgt, it, debug=it == 4)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
