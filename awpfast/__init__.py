"""awpfast: fast, correct, drop-in Adversarial Weight Perturbation for PyTorch.

``awpfast.AWP`` wraps any ``torch.optim`` optimizer; ``awpfast.SAM`` (SAM, adaptive SAM, ASAM)
and ``awpfast.BoxAWP`` (the Box AWP of NLP fine-tuning) are the other rules on the same engine
(``awpfast.WeightPerturbation``); ``awpfast.attacks`` (PGD, TRADES attack),
``awpfast.losses`` (AT, TRADES, MART), ``awpfast.models`` (PreActResNet-18, WideResNet, a small
CNN) and ``awpfast.ops`` (the multi-tensor seam) are importable from here. The training and
evaluation CLIs are ``awpfast.train`` and ``awpfast.evaluate``.
"""
import importlib

__version__ = "0.1.0"
__all__ = ["AWP", "SAM", "BoxAWP", "WeightPerturbation", "ops", "attacks", "losses", "models"]

# Imported on first use (PEP 562), so that ``import awpfast`` and the CLIs' argument checks do not
# pay for importing torch: a bad command line is answered at once.
_LAZY = {"AWP": ".rules", "SAM": ".rules", "BoxAWP": ".rules", "WeightPerturbation": ".optim",
         "ops": None, "attacks": None, "losses": None, "models": None}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'awpfast' has no attribute {name!r}")
    where = _LAZY[name]
    value = importlib.import_module(f".{name}" if where is None else where, __name__)
    if where is not None:
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
