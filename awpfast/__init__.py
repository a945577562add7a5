"""awpfast: fast, correct, drop-in Adversarial Weight Perturbation for PyTorch."""
from . import ops  # noqa: F401

__version__ = "0.1.0"

try:  # the wrapper lands in optim.py
    from .optim import AWP  # noqa: F401
except ImportError:  # pragma: no cover - during bootstrap only
    pass
