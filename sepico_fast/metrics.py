"""Segmentation metrics (method §7): a confusion matrix accumulated on the device."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .contrast.validation import check_ignore_index, check_value

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class ConfusionMatrix:
    """C x C pixel counts, rows = ground truth, columns = prediction, int64 on ``device``.

    ``update`` is a single scatter-add on the device (no host sync); pixels whose target
    is ``ignore_index`` are skipped. IoU_c = TP / (TP + FP + FN), NaN for a class absent
    from both prediction and ground truth; mIoU is the mean over the non-NaN classes.
    Under DDP call ``all_reduce()`` once before reading the IoU.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        check_ignore_index(ignore_index, num_classes)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.state = torch.zeros(num_classes, num_classes, dtype=torch.int64,
                                 device=torch.device(device) if device is not None else None)

    @property
    def device(self) -> torch.device:
        return self.state.device

    def reset(self) -> None:
        self.state.zero_()

    def to(self, device) -> "ConfusionMatrix":
        self.state = self.state.to(device)
        return self

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch. ``pred`` and ``target`` are integer label maps of the same shape
        (a [B,1,H,W] target also matches a [B,H,W] prediction)."""
        for name, t in (("pred", pred), ("target", target)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _INTEGER_DTYPES:
                raise ValueError(f"{name} must be an integer label map, got dtype {t.dtype} "
                                 "(arg-max the logits first)")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device} but the matrix is on {self.device}")
        squeeze = lambda shape: tuple(s for s in shape if s != 1)  # noqa: E731
        if pred.shape != target.shape and squeeze(pred.shape) != squeeze(target.shape):
            raise ValueError(f"pred shape {tuple(pred.shape)} does not match target shape "
                             f"{tuple(target.shape)}")
        c = self.num_classes
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).long()
        if target.numel() == 0:
            return
        valid = target != self.ignore_index
        check_value(~valid | ((target >= 0) & (target < c)),
                    f"target must hold values in 0..{c - 1} or ignore_index={self.ignore_index}")
        check_value(~valid | ((pred >= 0) & (pred < c)), f"pred must hold values in 0..{c - 1}")
        # Ignored pixels land in an extra bin c*c that is dropped.
        cell = torch.where(valid, target * c + pred, torch.full_like(target, c * c))
        counts = torch.zeros(c * c + 1, dtype=torch.int64, device=self.device)
        counts.scatter_add_(0, cell, torch.ones_like(cell))
        self.state += counts[: c * c].view(c, c)

    def all_reduce(self, process_group=None) -> None:
        """Sum the matrices of all ranks (no-op without an initialised process group)."""
        if process_group is None and not (dist.is_available() and dist.is_initialized()):
            return
        dist.all_reduce(self.state, op=dist.ReduceOp.SUM, group=process_group)

    def iou(self) -> torch.Tensor:
        """Per-class IoU [C] float64 (NaN where the class is in neither pred nor target)."""
        m = self.state.double()
        tp = m.diagonal()
        union = m.sum(0) + m.sum(1) - tp
        return tp / union  # 0/0 -> NaN for absent classes

    def miou(self) -> torch.Tensor:
        """Mean IoU over classes present in prediction or target (0-d float64; NaN if none)."""
        return torch.nanmean(self.iou())
