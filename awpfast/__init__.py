"""awpfast: fast, correct, drop-in Adversarial Weight Perturbation for PyTorch."""
from . import ops  # noqa: F401
from .family import SAM, BoxAWP  # noqa: F401
from .optim import AWP, WeightPerturbation  # noqa: F401

__version__ = "0.1.0"
__all__ = ["AWP", "SAM", "BoxAWP", "WeightPerturbation", "ops"]
