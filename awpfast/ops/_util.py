"""Small tensor helpers shared by the seam's backends and the layers above it.

Imports nothing from awpfast: any module of ``awpfast.ops`` (and ``awpfast.perturb`` above the
seam) can use it without an import circle.
"""
from typing import List

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a group: float64 for float64 tensors, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def floats(v, n: int) -> List[float]:
    """Per-tensor floats: a single number repeated ``n`` times, or the numbers of a sequence."""
    if isinstance(v, (int, float)):
        return [float(v)] * n
    return [float(x) for x in v]


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one gap-free block of memory in some dimension order
    (contiguous, channels_last, any permutation; size-1 dimensions ignored), so that a 1-D
    view over its storage holds exactly its elements."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True
