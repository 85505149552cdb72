"""Which implementation of an op runs: one rule for every op with a fast path.

    resolve_impl(op, impl, device, dtype=None) -> "torch" | "triton" | "cuda"

Two families of ops have a fast path next to their torch implementation, each described by
a ``Backend`` and registered with the names of its ops: the contrast losses and class
statistics (``sepico_fast.contrast``: Triton kernels, ``contrast.validation``) and the
data-side ops (``sepico_fast.ops``: the CUDA extension built from ``csrc/``,
``ops._dispatch``). The rule is the same for both:

* ``impl=None`` asks the backend which one can run for inputs on ``device`` of ``dtype``;
  when it has to take torch for CUDA inputs, one WARNING per op and reason says why
  (logger ``sepico_fast.<family>``); CPU inputs take torch silently (the intended path);
* ``"torch"`` is always accepted; the backend's fast name is accepted after the backend's
  check (an error naming what is missing when it cannot run); any other name is a
  ``ValueError``;
* the choice is logged once per op and implementation (INFO for CUDA inputs, DEBUG for CPU
  inputs), outside ``torch.compile`` tracing.

Imports nothing from the package: every layer may use it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

IMPLS = ("torch", "triton", "cuda")


@dataclass(frozen=True)
class Backend:
    """The fast path of one family of ops."""
    family: str                 # "contrast" | "ops": logger sepico_fast.<family>, message prefix
    fast: str                   # the implementation name of the fast path: "triton" | "cuda"
    fast_name: str              # how the log names it
    fallback_name: str          # how the log names the torch path it falls back to
    # impl=None: (implementation, reason) for inputs on a device of a dtype (None: any)
    choose: Callable[[str, torch.device, torch.dtype | None], tuple[str, str]]
    # explicit impl=<fast>: raise (naming what is missing) when it cannot run on the device
    check_fast: Callable[[str, torch.device], None] | None = None


_BACKENDS: dict[str, Backend] = {}
_warned: set[tuple[str, str]] = set()
_logged: set[tuple[str, str]] = set()


def register(backend: Backend, ops: Iterable[str]) -> None:
    """Make ``resolve_impl`` answer for ``ops`` with ``backend`` (done by the family's module)."""
    for op in ops:
        _BACKENDS[op] = backend


def backend_of(op: str) -> Backend:
    try:
        return _BACKENDS[op]
    except KeyError:
        raise KeyError(f"no implementation choice registered for op {op!r}; known: "
                       f"{', '.join(sorted(_BACKENDS))}") from None


def check_impl(op: str, impl: str | None) -> Backend:
    """Refuse an implementation name ``op`` does not have (ValueError); ``op``'s backend."""
    backend = backend_of(op)
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be None or one of {IMPLS}, got {impl!r}")
    if impl is not None and impl not in ("torch", backend.fast):
        raise ValueError(f"impl={impl!r} has no kernel for {op}; available impls: torch, {backend.fast} "
                         "(or None for the fastest)")
    return backend


def resolve_impl(op: str, impl: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The implementation of ``op`` for inputs on ``device`` of ``dtype`` (the module docstring's rule)."""
    backend = check_impl(op, impl)
    on_cuda = device.type == "cuda"
    if impl is None:
        chosen, why = backend.choose(op, device, dtype)
        if on_cuda and chosen == "torch":
            _warn_once(backend, op, f"sepico_fast.{backend.family}.{op}: CUDA inputs, but {why}; "
                                    f"using the {backend.fallback_name}")
    else:
        if impl == backend.fast and backend.check_fast is not None:
            backend.check_fast(op, device)
        chosen, why = impl, "requested"
    # Logging is a side effect torch.compile cannot put in a graph; eager calls log it.
    if not torch.compiler.is_compiling() and (op, chosen) not in _logged:
        _logged.add((op, chosen))
        name = backend.fast_name if chosen == backend.fast else backend.fallback_name
        # CPU inputs always take torch: not worth a line in the trainer's output
        logging.getLogger(f"sepico_fast.{backend.family}").log(
            logging.INFO if on_cuda else logging.DEBUG, "sepico_fast.%s.%s: using the %s (%s)",
            backend.family, op, name, why)
    return chosen


def _warn_once(backend: Backend, op: str, message: str) -> None:
    if torch.compiler.is_compiling() or (op, message) in _warned:
        return
    _warned.add((op, message))
    logging.getLogger(f"sepico_fast.{backend.family}").warning(message)
