import os

import pytest
import torch

# Without CUDA the Triton backend runs on the interpreter; the flag must be set before
# anything imports triton (test collection may import the backend through the seam).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN never passes (returns inf)."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    den = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / den if den > 0 else num


def tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-2}[dtype]


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests choose backends explicitly; a developer's AWPFAST_BACKEND must not leak in."""
    if os.environ.get("AWPFAST_TEST_KEEP_BACKEND") != "1":
        monkeypatch.delenv("AWPFAST_BACKEND", raising=False)
