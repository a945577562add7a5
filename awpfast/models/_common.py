"""Pieces shared by the reference models."""
from typing import Optional, Sequence

import torch
from torch import nn


class InputNormalization(nn.Module):
    """(x - mean) / std with non-persistent buffers: absent from the state dict, so checkpoints of
    the reference code and RobustBench load unchanged; identity when no statistics are given."""

    def __init__(self, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std for input normalization, or neither")
        self.enabled = mean is not None
        if self.enabled:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        if not self.enabled:
            return x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def check_input(x: torch.Tensor, in_channels: int, name: str) -> None:
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(
            f"{name} expects NCHW input with {in_channels} channels, got shape {tuple(x.shape)}; "
            "images belong in [0, 1] as float tensors of shape (batch, channels, height, width)")
