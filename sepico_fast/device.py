"""Where and in which precision the networks run: one rule for training and evaluation.

``resolve_device("auto" | "cpu" | "cuda" | "cuda:N")`` -> ``torch.device`` (``device_problem``
says, in one line, why a value cannot be used on this machine), ``choose_precision(device,
amp, cpu_amp)`` -> the autocast dtype of ``--amp``, and ``autocast(device, dtype)`` the
context that applies it (``dtype`` None: float32, autocast off).

Precision of ``--amp`` (``python -m sepico_fast.train`` and ``python -m sepico_fast.evaluate``):

* CUDA: bf16 autocast when the GPU has bf16 tensor cores (Ampere and later), else fp16
  autocast (training adds a GradScaler). ``torch.cuda.is_bf16_supported()`` alone also says
  yes on Volta/Turing, where bf16 is emulated, slowly, hence ``including_emulation=False``.
* CPU: float32 unless ``--cpu-amp`` (bf16 autocast): bf16 autocast measured slower than
  float32 for the tiny models on the CPU (docs/training.md, "Mixed precision").

Imports nothing from the package: every layer may use it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEVICE_VALUES = "auto, cpu, cuda or cuda:N"


def device_problem(text: str) -> str | None:
    """Why ``--device TEXT`` cannot be used on this machine (one line), or None when it can."""
    if text in ("auto", "cpu"):
        return None
    if text != "cuda" and not (text.startswith("cuda:") and text[5:].isdigit()):
        return f"expected {DEVICE_VALUES}"
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine; use auto or cpu"
    count = torch.cuda.device_count()
    if text.startswith("cuda:") and int(text[5:]) >= count:
        return f"this machine has {count} CUDA device(s): cuda:0 .. cuda:{count - 1}"
    return None


def resolve_device(text: str, local_rank: int | None = None) -> torch.device:
    """``--device`` as a ``torch.device``: auto -> ``cuda:<local_rank or 0>`` when CUDA is
    available, else cpu; any other value as given, after ``device_problem`` (a ValueError
    "--device: <why> (got <value>)" when it cannot be used)."""
    problem = device_problem(text)
    if problem is not None:
        raise ValueError(f"--device: {problem} (got {text!r})")
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank or 0)
        return torch.device("cpu")
    return torch.device(text)


@dataclass(frozen=True)
class Precision:
    """What ``--amp`` means on one device: the autocast dtype (None: float32), whether the
    backward pass needs a GradScaler (fp16), and the words the programs print."""
    dtype: torch.dtype | None
    grad_scaler: bool
    description: str


def choose_precision(device: torch.device, amp: bool, cpu_amp: bool = False) -> Precision:
    """The precision rule of the module docstring (``amp``: --amp, ``cpu_amp``: --cpu-amp)."""
    if not amp:
        return Precision(None, False, "float32")
    if device.type == "cuda":
        with torch.cuda.device(device):
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if native_bf16:
            return Precision(torch.bfloat16, False, "bf16 autocast")
        return Precision(torch.float16, True, "fp16 autocast")
    if cpu_amp:
        return Precision(torch.bfloat16, False, "bf16 autocast (cpu)")
    return Precision(None, False, "float32 (--amp on CPU: bf16 autocast is slower here; --cpu-amp forces it)")


def autocast(device: torch.device, dtype: torch.dtype | None, cache_enabled: bool = True):
    """Autocast to ``dtype`` on ``device``'s type; ``dtype`` None: a disabled autocast (float32).
    ``cache_enabled=False`` for code captured into a CUDA graph (no reuse of cached casts)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None,
                          cache_enabled=cache_enabled)
