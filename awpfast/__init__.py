"""awpfast: fast, correct, drop-in Adversarial Weight Perturbation for PyTorch.

``awpfast.AWP`` wraps any ``torch.optim`` optimizer; ``awpfast.SAM`` (SAM, adaptive SAM, ASAM)
and ``awpfast.BoxAWP`` (the Box AWP of NLP fine-tuning) are the other rules on the same engine
(``awpfast.WeightPerturbation``); ``awpfast.attacks`` (PGD, TRADES attack),
``awpfast.losses`` (AT, TRADES, MART), ``awpfast.models`` (PreActResNet-18, WideResNet, a small
CNN) and ``awpfast.ops`` (the multi-tensor seam) are importable from here. The training and
evaluation CLIs are ``awpfast.train`` and ``awpfast.evaluate``.
"""
from . import ops  # noqa: F401
from .optim import WeightPerturbation  # noqa: F401
from .rules import AWP, SAM, BoxAWP  # noqa: F401
from . import attacks, losses, models  # noqa: F401,E402

__version__ = "0.1.0"
__all__ = ["AWP", "SAM", "BoxAWP", "WeightPerturbation", "ops", "attacks", "losses", "models"]
