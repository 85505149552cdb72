"""ResNet-V1c backbone (deep stem, pytorch-style strides, dilated last stages) as used by
DeepLab-v2 in SePiCo, with the mmseg state-dict layout (``stem.N``, ``layerK.i.convJ/bnJ``,
``downsample.0/1``).

Output stride 8: stage strides (1, 2, 1, 1) and dilations (1, 1, 2, 4) with
*contract dilation* (the first block of a dilated stage uses half the dilation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ResNetConfig:
    blocks: tuple[int, int, int, int]
    stem_channels: int = 64
    base_channels: int = 64
    strides: tuple[int, int, int, int] = (1, 2, 1, 1)
    dilations: tuple[int, int, int, int] = (1, 1, 2, 4)


RESNET_CONFIGS: dict[str, ResNetConfig] = {
    "r50": ResNetConfig((3, 4, 6, 3)),
    "r101": ResNetConfig((3, 4, 23, 3)),
    # Not upstream: a small CPU-sized variant for smoke runs and tests.
    "tiny": ResNetConfig((1, 1, 1, 1), stem_channels=32, base_channels=16),
}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, dilation: int):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # pytorch style: the stride sits on the 3x3 conv.
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class ResNetV1c(nn.Module):
    """Returns the four stage outputs (channels 4*base*[1,2,4,8]) at strides 4, 8, 8, 8."""

    def __init__(self, config: ResNetConfig, in_channels: int = 3):
        super().__init__()
        self.config = config
        half = config.stem_channels // 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, 1, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, config.stem_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(config.stem_channels), nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = []
        prev = config.stem_channels
        for k, (n, stride, dilation) in enumerate(zip(config.blocks, config.strides, config.dilations)):
            width = config.base_channels * 2**k
            first_dilation = dilation // 2 if dilation > 1 else dilation  # contract_dilation
            blocks = [Bottleneck(prev, width, stride, first_dilation)]
            prev = width * Bottleneck.expansion
            blocks += [Bottleneck(prev, width, 1, dilation) for _ in range(n - 1)]
            setattr(self, f"layer{k + 1}", nn.Sequential(*blocks))
            widths.append(prev)
        self.widths = tuple(widths)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmseg random init: He-normal (fan-out) convs, unit BN, last BN of each block zeroed."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)  # zero_init_residual

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.stem(x))
        outs = []
        for k in range(1, 5):
            x = getattr(self, f"layer{k}")(x)
            outs.append(x)
        return outs
