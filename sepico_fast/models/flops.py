"""Parameter and FLOP counts of the segmentors (for MFU bookkeeping).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta``
device (shapes only, no arithmetic, so even MiT-B5 at 640x640 takes about a second on a
CPU). Convention: one multiply-add = 2 FLOPs; only matrix products and convolutions
(``mm``, ``addmm``, ``bmm``, attention, ``convolution``) are counted. Normalisation,
activations, softmax, interpolation and additions are not (they are memory-bound and a
few percent of the total at most).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import build_segmentor


@dataclass(frozen=True)
class ModelCost:
    arch: str
    params: int            # all parameters of the segmentor
    params_backbone: int
    params_decode: int
    params_proj: int
    flops_backbone: int    # backbone forward, one image
    flops_decode: int      # decode head forward, one image
    flops_proj: int        # projection head forward, one image (training only)

    @property
    def flops_infer(self) -> int:
        """Inference (``predict``): backbone + decode head."""
        return self.flops_backbone + self.flops_decode

    @property
    def flops_train_forward(self) -> int:
        return self.flops_infer + self.flops_proj


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def model_cost(arch: str, height: int = 640, width: int = 640, num_classes: int = 19,
               proj_dim: int = 512) -> ModelCost:
    """Parameters and per-image forward FLOPs of ``arch`` at ``height`` x ``width``."""
    if height < 32 or width < 32:
        raise ValueError(f"height and width must be >= 32, got {height}x{width}")
    with torch.device("meta"):
        model = build_segmentor(arch, num_classes, proj_dim).eval()
        img = torch.empty(1, 3, height, width)
        feats = model.extract(img)
    flops_backbone = _count(lambda: model.extract(img))
    flops_decode = _count(lambda: model.decode(feats))
    flops_proj = _count(lambda: model.project(feats))

    def n(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return ModelCost(arch, n(model), n(model.backbone), n(model.decode_head), n(model.auxiliary_head),
                     flops_backbone, flops_decode, flops_proj)


def cost_table(archs, height: int = 640, width: int = 640) -> str:
    """Markdown table of :func:`model_cost` for ``archs``."""
    rows = [
        "| arch | params | backbone | decode head | proj head | inference (backbone+decode) |"
        " forward with proj |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arch in archs:
        c = model_cost(arch, height, width)
        g = [f"{x / 1e9:.1f}" for x in (c.flops_backbone, c.flops_decode, c.flops_proj,
                                         c.flops_infer, c.flops_train_forward)]
        rows.append(f"| {arch} | {c.params:,} | " + " | ".join(g) + " |")
    return "\n".join(rows)
