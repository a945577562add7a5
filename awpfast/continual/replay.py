"""A reservoir replay memory (Vitter's algorithm R): after ``n`` samples have streamed
past, every one of them is in the memory with probability ``capacity / n``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["ReservoirMemory"]


class ReservoirMemory:
    """Fixed-capacity replay buffer filled by reservoir sampling.

    Buffers are allocated on the first ``add`` (shape and dtype of the samples). Random
    choices use ``generator`` (a CPU ``torch.Generator``), so a run is reproducible.
    """

    def __init__(self, capacity: int, generator: Optional[torch.Generator] = None):
        if capacity < 0:
            raise ValueError(f"replay capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.generator = generator
        self.seen = 0
        self.size = 0
        self.x: Optional[torch.Tensor] = None
        self.y: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.size

    def memory_bytes(self) -> int:
        """Bytes held by the stored samples and labels."""
        return sum(t.numel() * t.element_size() for t in (self.x, self.y) if t is not None)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator).item())

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Stream a batch of samples ``x`` (first dim = batch) with labels ``y`` past the memory."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"replay: {x.shape[0]} samples but {y.shape[0]} labels")
        if self.capacity == 0:
            self.seen += x.shape[0]
            return
        if self.x is None:
            self.x = x.new_empty((self.capacity,) + tuple(x.shape[1:]))
            self.y = y.new_empty((self.capacity,) + tuple(y.shape[1:]))
        elif x.shape[1:] != self.x.shape[1:]:
            raise ValueError(f"replay: samples of shape {tuple(x.shape[1:])} do not match the stored "
                             f"{tuple(self.x.shape[1:])}")
        for i in range(x.shape[0]):
            self.seen += 1
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            else:
                slot = self._randint(self.seen)
                if slot >= self.capacity:
                    continue
            self.x[slot] = x[i]
            self.y[slot] = y[i]

    def sample(self, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Up to ``n`` distinct stored samples, in random order (empty tensors when empty)."""
        if self.size == 0 or n <= 0:
            if self.x is None:
                return torch.empty(0), torch.empty(0, dtype=torch.long)
            return self.x[:0], self.y[:0]
        idx = torch.randperm(self.size, generator=self.generator)[:min(n, self.size)]
        idx = idx.to(self.x.device)
        return self.x[idx], self.y[idx]

    def all(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every stored sample (views)."""
        if self.x is None:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        return self.x[:self.size], self.y[:self.size]
