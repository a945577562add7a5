"""PreActResNet-18 with the state-dict layout of the AWP reference code and RobustBench.

Keys: conv1, layer{1..4}.{0,1}.{bn1,conv1,bn2,conv2,shortcut.0}, bn, linear.
"""
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import nn

from ._common import InputNormalization, check_input


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet (He et al. 2016) for 32x32 inputs in [0, 1]; ``mean`` / ``std``: optional
    per-channel normalization inside the model (not part of the state dict)."""

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        super().__init__()
        self.in_channels = in_channels
        self.normalize = InputNormalization(mean, std)
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        check_input(x, self.in_channels, type(self).__name__)
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        # adaptive pooling: identical to the reference's avg_pool2d(4) on 32x32 inputs, and
        # it also accepts other input sizes
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def PreActResNet18(num_classes: int = 10, **kw) -> PreActResNet:
    """PreActResNet-18 (the AT / AWP reference architecture); ``kw`` as :class:`PreActResNet`."""
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, **kw)
