"""awpfast: fast, correct, drop-in Adversarial Weight Perturbation for PyTorch.

``awpfast.AWP`` wraps any ``torch.optim`` optimizer; ``awpfast.attacks`` (PGD, TRADES attack),
``awpfast.losses`` (AT, TRADES, MART), ``awpfast.models`` (PreActResNet-18, WideResNet, a small
CNN) and ``awpfast.ops`` (the multi-tensor seam) are importable from here. The training and
evaluation CLIs are ``awpfast.train`` and ``awpfast.evaluate``.
"""
from . import ops  # noqa: F401
from .optim import AWP  # noqa: F401
from . import attacks, losses, models  # noqa: F401,E402

__version__ = "0.1.0"
__all__ = ["AWP", "ops", "attacks", "losses", "models"]
