"""``--pseudo-diagnostics``: how good the teacher's pseudo labels are, against target labels.

Only for target training sets that have labels (the synthetic pair; Cityscapes train has
gtFine). The training never reads any of this: the step hands the final pseudo labels of
the target crop (ŷ, confidence p) and the crop's labels to :meth:`PseudoDiagnostics.update`,
which adds them to two per-class confusion matrices on the device (all pixels; pixels with
p ≥ the threshold), without a host sync. On logging steps :meth:`stage` queues a
non-blocking copy of the counts to host memory *before* the log line's own sync, and
:meth:`collect` reads them after it, so the diagnostics add no sync of their own.

Per class c, over pixels with a valid target label (not 255) outside the ignored rows:

* precision   = #(ŷ = c, y = c) / #(ŷ = c)              share of pseudo label c that is right
* coverage    = #(ŷ = c, y = c) / #(y = c)              share of true c pixels labelled c (recall)
* precision_thr, coverage_thr: the same counting only pixels with p ≥ threshold (ŷ is then
  a confident label; coverage_thr = share of true c pixels that get a confident, right label)
* accuracy / accuracy_thr: all classes together (#right / #labelled; the _thr numerator and
  denominator count confident pixels only).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..data.labels import CLASSES

METRICS = ("precision", "coverage", "precision_thr", "coverage_thr")


def metrics_from_counts(cm_all: np.ndarray, cm_thr: np.ndarray) -> dict[str, np.ndarray | float]:
    """Per-class precision / coverage (NaN where undefined) and overall accuracies, in [0, 1]."""
    cm_all, cm_thr = cm_all.astype(np.float64), cm_thr.astype(np.float64)
    gt = cm_all.sum(axis=1)

    def ratio(a, b):
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(b > 0, a / np.maximum(b, 1), np.nan)

    out: dict[str, np.ndarray | float] = {
        "precision": ratio(np.diag(cm_all), cm_all.sum(axis=0)),
        "coverage": ratio(np.diag(cm_all), gt),
        "precision_thr": ratio(np.diag(cm_thr), cm_thr.sum(axis=0)),
        "coverage_thr": ratio(np.diag(cm_thr), gt),
        "gt_pixels": gt,
    }
    out["accuracy"] = float(np.trace(cm_all) / cm_all.sum()) if cm_all.sum() else math.nan
    out["accuracy_thr"] = float(np.trace(cm_thr) / cm_thr.sum()) if cm_thr.sum() else math.nan
    return out


def _class_names(num_classes: int) -> list[str]:
    names = list(CLASSES)[:num_classes]
    return names + [f"class{i}" for i in range(len(names), num_classes)]


class PseudoDiagnostics:
    """Device-side counters of pseudo-label quality; see the module doc."""

    def __init__(self, num_classes: int, threshold: float, device: torch.device,
                 ignore_rows: tuple[int, int] = (0, 0)):
        self.num_classes, self.threshold = int(num_classes), float(threshold)
        self.ignore_top, self.ignore_bottom = ignore_rows
        self.device = torch.device(device)
        c2 = self.num_classes * self.num_classes
        # [2, C*C + 1]: all pixels / confident pixels; the last bin collects invalid pixels.
        self.counts = torch.zeros(2, c2 + 1, dtype=torch.int64, device=self.device)
        self._host = torch.zeros_like(self.counts, device="cpu", pin_memory=self.device.type == "cuda")
        self._staged = False
        self.period = np.zeros((2, self.num_classes, self.num_classes), dtype=np.int64)

    @torch.no_grad()
    def update(self, prob: torch.Tensor, plabel: torch.Tensor, gt: torch.Tensor) -> None:
        """Add one batch: confidence p [B,H,W], pseudo labels ŷ [B,H,W], target labels [B,H,W] or [B,1,H,W]."""
        gt = gt.reshape(plabel.shape).long()
        c = self.num_classes
        h = plabel.shape[-2]
        rows = torch.arange(h, device=plabel.device)
        keep = ((rows >= self.ignore_top) & (rows < h - self.ignore_bottom)).view(1, h, 1)
        valid = keep & (gt >= 0) & (gt < c) & (plabel >= 0) & (plabel < c)
        trash = c * c
        idx = torch.where(valid, gt * c + plabel.long(), torch.full_like(gt, trash)).flatten()
        confident = (prob >= self.threshold).flatten()
        idx_thr = torch.where(confident, idx, torch.full_like(idx, trash))
        ones = torch.ones_like(idx)
        # index_put_ with accumulate: no host sync (bincount would read the max on CUDA).
        self.counts[0].index_put_((idx,), ones, accumulate=True)
        self.counts[1].index_put_((idx_thr,), ones, accumulate=True)

    def stage(self) -> None:
        """Queue the copy of the counts to host memory and restart them (before the log sync)."""
        self._host.copy_(self.counts, non_blocking=True)
        self.counts.zero_()
        self._staged = True

    def collect(self, sync: bool = False) -> dict[str, float]:
        """Scalars of the staged window (call after a sync, or pass ``sync=True``); the counts
        also join the period reported by :meth:`table`."""
        if not self._staged:
            return {}
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._staged = False
        c = self.num_classes
        cm = self._host[:, : c * c].numpy().reshape(2, c, c).copy()
        self.period += cm
        return self.scalars(cm[0], cm[1])

    def scalars(self, cm_all: np.ndarray, cm_thr: np.ndarray) -> dict[str, float]:
        """``pseudo/<metric>/<class>`` and ``pseudo/<metric>_mean`` in percent (undefined ones left out)."""
        m = metrics_from_counts(cm_all, cm_thr)
        out: dict[str, float] = {}
        for metric in METRICS:
            vals = m[metric]
            for name, v in zip(_class_names(self.num_classes), vals):
                if not math.isnan(v):
                    out[f"pseudo/{metric}/{name}"] = 100.0 * float(v)
            defined = vals[~np.isnan(vals)]
            if defined.size:
                out[f"pseudo/{metric}_mean"] = 100.0 * float(defined.mean())
        for k in ("accuracy", "accuracy_thr"):
            if not math.isnan(m[k]):
                out[f"pseudo/{k}"] = 100.0 * m[k]
        return out

    def table(self, title: str = "", reset: bool = True) -> str:
        """Per-class table of the counts collected since the last table (percent, n/a = undefined)."""
        m = metrics_from_counts(self.period[0], self.period[1])
        total = max(int(m["gt_pixels"].sum()), 1)
        head = (f"{'class':<16}{'precision':>10}{'coverage':>10}{'prec@thr':>10}{'cov@thr':>10}{'label %':>9}")
        lines = [f"pseudo labels vs target labels{(' (' + title + ')') if title else ''}, "
                 f"threshold {self.threshold:g}, {total} labelled pixels", head]

        def pct(v):
            return f"{'n/a' if math.isnan(v) else f'{100 * v:.1f}':>10}"

        for i, name in enumerate(_class_names(self.num_classes)):
            lines.append(f"{name:<16}" + "".join(pct(m[k][i]) for k in METRICS)
                         + f"{100 * m['gt_pixels'][i] / total:>9.2f}")
        means = [np.nanmean(m[k]) if np.isfinite(m[k]).any() else math.nan for k in METRICS]
        lines.append(f"{'class mean':<16}" + "".join(pct(v) for v in means))
        lines.append(f"{'all pixels':<16}{pct(m['accuracy'])}{'':>10}{pct(m['accuracy_thr'])}")
        if reset:
            self.period[:] = 0
        return "\n".join(lines)
