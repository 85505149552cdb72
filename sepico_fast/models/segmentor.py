"""Segmentor = backbone + decode head + projection (auxiliary) head, upstream key prefixes."""
from __future__ import annotations

import torch
from torch import nn

from .mit import DropPath


class Segmentor(nn.Module):
    """SePiCo's EncoderDecoderProjector without the mmseg machinery.

    Attribute names ``backbone`` / ``decode_head`` / ``auxiliary_head`` give the upstream
    state-dict prefixes. The backbone runs once per image: ``extract`` returns its four
    maps and both heads consume them (``decode`` / ``project``).
    """

    def __init__(self, arch: str, backbone: nn.Module, decode_head: nn.Module,
                 auxiliary_head: nn.Module, output_stride: int):
        super().__init__()
        self.arch = arch
        self.output_stride = output_stride
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.stochastic = True

    def set_stochastic(self, enabled: bool) -> "Segmentor":
        """Switch dropout and drop-path on/off independently of train/eval mode.

        The SePiCo teacher runs with BatchNorm in training mode (batch statistics, an
        upstream quirk) but without dropout/drop-path: ``set_stochastic(False)`` keeps that
        setting across later ``train()`` / ``eval()`` calls.
        """
        self.stochastic = bool(enabled)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "Segmentor":
        super().train(mode)
        if mode and not self.stochastic:
            for m in self.modules():
                if isinstance(m, (nn.modules.dropout._DropoutNd, DropPath)):
                    m.training = False
        return self

    def use_upstream_layout(self, enabled: bool = True) -> "Segmentor":
        """Run with the authors' dataflow inside the network (benchmark baseline, models/layout.py):
        ``F.conv2d`` for every convolution, explicit attention, and contiguous NCHW copies where
        their code makes them. Same parameters and the same mathematics."""
        for m in self.modules():
            if hasattr(type(m), "upstream_layout"):
                m.upstream_layout = bool(enabled)
        return self

    def extract(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Backbone feature maps (4 levels) for a normalised image batch [B,3,H,W]."""
        return self.backbone(img)

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Class logits [B,C,H/s,W/s] at the decoder's native stride s."""
        return self.decode_head(feats)

    def project(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """L2-normalised pixel embeddings [B,A,H/s,W/s]."""
        return self.auxiliary_head(feats)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.extract(img)
        return self.decode(feats), self.project(feats)

    def predict(self, img: torch.Tensor) -> torch.Tensor:
        """Inference logits at native stride; the projection head is not run."""
        return self.decode(self.extract(img))
