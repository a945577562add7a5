"""A small CNN for the embedded (scikit-learn digits) data and fast CPU experiments.

Inputs in [0, 1], NCHW with ``in_channels`` channels, any spatial size >= 4. Four 3x3
conv + BatchNorm + ReLU layers (two 2x2 max-pools), adaptive average pooling to 4x4 and a
two-layer classifier head. Roughly 0.4 M parameters at ``width=32``: enough capacity to
overfit the 1 300-image digits training split under adversarial training, which is what
the robust-overfitting reproduction needs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import InputNormalization

__all__ = ["SmallCNN"]


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Args: ``num_classes``, ``in_channels``, ``width`` (channels of the first conv layers),
    ``hidden`` (units of the head), ``mean`` / ``std`` (optional per-channel input
    normalization inside the model; not part of the state dict)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32, hidden: int = 256,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        super().__init__()
        self.in_channels = in_channels
        self.normalize = InputNormalization(mean, std)
        w = int(width)
        self.features = nn.Sequential(
            _conv_bn(in_channels, w), _conv_bn(w, w), nn.MaxPool2d(2),
            _conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w), nn.MaxPool2d(2, ceil_mode=True),
        )
        self.fc1 = nn.Linear(2 * w * 16, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SmallCNN expects NCHW input with {self.in_channels} channels, got shape {tuple(x.shape)}")
        out = self.features(self.normalize(x))
        out = F.adaptive_avg_pool2d(out, 4).flatten(1)
        return self.fc2(F.relu(self.fc1(out)))
