"""PreAct-ResNet18 whose state-dict layout (names, order, shapes) equals BackdoorBench's `models/preact_resnet.py`.

Layout: 3x3 stem conv (no BN), four stages of two pre-activation basic blocks (64/128/256/512 channels at
width 1.0, strides 1/2/2/2), AdaptiveAvgPool2d(1), linear head; no BN-ReLU after the last stage. Each block
holds bn1, conv1, bn2, conv2 and, when it changes shape, `shortcut` = Sequential(1x1 conv).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ftsam_plugin.models._registry import register_model

__all__ = ["PreActBlock", "PreActResNet", "scaled_widths", "preactresnet18"]

BASE_WIDTHS = (64, 128, 256, 512)


def scaled_widths(width: float, base: Sequence[int] = BASE_WIDTHS) -> tuple:
    """Stage widths times `width`, rounded, at least 1 each."""
    return tuple(max(1, int(round(c * width))) for c in base)


class PreActBlock(nn.Module):
    """out = conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut, the shortcut taken from relu(bn1(x)) when it projects."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        # Registration order fixes the state-dict order: bn1, conv1, bn2, conv2, shortcut.
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.projects = stride != 1 or in_planes != planes
        if self.projects:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        identity = self.shortcut(pre) if self.projects else x
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + identity


class PreActResNet(nn.Module):
    """Pre-activation ResNet with an adaptive average pool, so any input size >= 8 px works.

    Args:
        blocks_per_stage: number of blocks in each of the four stages ((2, 2, 2, 2) for PreAct-ResNet18).
        num_classes: classifier outputs.
        widths: channels of the four stages.
        in_channels: input image channels.
    """

    def __init__(
        self,
        blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        widths: Sequence[int] = BASE_WIDTHS,
        in_channels: int = 3,
    ):
        super().__init__()
        if len(blocks_per_stage) != 4 or len(widths) != 4:
            raise ValueError("PreActResNet needs four stages: blocks_per_stage and widths of length 4")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        channels = widths[0]
        for index, (planes, count) in enumerate(zip(widths, blocks_per_stage)):
            first_stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(count):
                blocks.append(PreActBlock(channels, planes, first_stride if block_index == 0 else 1))
                channels = planes
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


@register_model
def preactresnet18(num_classes: int = 10, image_size: int = 32, width: float = 1.0, in_channels: int = 3, **kwargs):
    """PreAct-ResNet18 (BackdoorBench's default backbone). `width` scales 64/128/256/512; 1.0 is BackdoorBench's."""
    if kwargs.get("pretrained"):
        raise ValueError("preactresnet18 has no pretrained weights here; train it (ftsam attack) or load a record")
    kwargs.pop("pretrained", None)
    if kwargs:
        raise ValueError(f"preactresnet18 got unexpected arguments: {sorted(kwargs)}")
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, widths=scaled_widths(width), in_channels=in_channels)
