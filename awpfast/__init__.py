"""awpfast: fast, correct, drop-in Adversarial Weight Perturbation for PyTorch.

``awpfast.AWP`` wraps any ``torch.optim`` optimizer; ``awpfast.SAM`` (SAM, adaptive SAM, ASAM),
``awpfast.BoxAWP`` (the Box AWP of NLP fine-tuning) and ``awpfast.RWP`` (robust weight
perturbation, Yu et al. 2022) are the other rules on the same engine
(``awpfast.WeightPerturbation``); ``awpfast.attacks`` (PGD, TRADES attack),
``awpfast.losses`` (AT, TRADES, MART), ``awpfast.models`` (PreActResNet-18, WideResNet, a small
CNN) and ``awpfast.ops`` (the multi-tensor seam) are importable from here. The training and
evaluation CLIs are ``awpfast.train`` and ``awpfast.evaluate``.
"""
from ._lazy import lazy_getattr

__version__ = "0.1.0"
__all__ = ["AWP", "SAM", "BoxAWP", "RWP", "WeightPerturbation", "ops", "attacks", "losses", "models"]

# Imported on first use, so that ``import awpfast`` and the CLIs' argument checks do not pay for
# importing torch: a bad command line is answered at once.
__getattr__ = lazy_getattr(__name__, {"AWP": ".rules", "SAM": ".rules", "BoxAWP": ".rules", "RWP": ".rules",
                                      "WeightPerturbation": ".optim", "ops": None, "attacks": None,
                                      "losses": None, "models": None})


def __dir__():
    return sorted(set(globals()) | set(__all__))
