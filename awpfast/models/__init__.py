"""Reference models: inputs in [0, 1] NCHW, output logits; state-dict keys compatible with the
AWP/TRADES reference code and RobustBench."""
from typing import Optional

from ..choices import INPUT_NORM_NAMES, MODEL_NAMES
from ..data import CIFAR10_MEAN, CIFAR10_STD
from .preactresnet import PreActResNet, PreActResNet18
from .small_cnn import SmallCNN
from .wideresnet import WideResNet

__all__ = ["PreActResNet", "PreActResNet18", "SmallCNN", "WideResNet", "create_model", "build_model", "MODEL_NAMES",
           "INPUT_NORMS"]

INPUT_NORMS = dict(zip(INPUT_NORM_NAMES, ((None, None), (CIFAR10_MEAN, CIFAR10_STD))))
"""The per-channel normalizations a model can carry inside it (inputs stay in [0, 1])."""


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kw):
    """Build a model by its CLI name: preact18, wrn34-10, wrn28-10 or small-cnn."""
    if name == "preact18":
        return PreActResNet18(num_classes=num_classes, in_channels=in_channels, **kw)
    if name in ("wrn34-10", "wrn28-10"):
        depth = 34 if name == "wrn34-10" else 28
        return WideResNet(depth=depth, widen_factor=10, num_classes=num_classes, in_channels=in_channels, **kw)
    if name == "small-cnn":
        return SmallCNN(num_classes=num_classes, in_channels=in_channels, **kw)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def build_model(name: str, num_classes: int, in_channels: int = 3, width: Optional[int] = None,
                input_norm: str = "none"):
    """A model by its CLI name; ``input_norm``: ``"none"`` or ``"cifar10"`` (mean/std inside the model)."""
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {', '.join(INPUT_NORMS)}, got {input_norm!r}")
    kw = {"width": width} if (name == "small-cnn" and width) else {}
    mean, std = INPUT_NORMS[input_norm]
    if mean is not None:
        if in_channels != len(mean):
            raise ValueError(f"input_norm {input_norm!r} has {len(mean)} channels, the data {in_channels}")
        kw.update(mean=mean, std=std)
    return create_model(name, num_classes=num_classes, in_channels=in_channels, **kw)
