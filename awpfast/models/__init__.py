"""Reference models: inputs in [0, 1] NCHW, output logits; state-dict keys compatible with the
AWP/TRADES reference code and RobustBench."""
from .preactresnet import PreActResNet, PreActResNet18
from .small_cnn import SmallCNN
from .wideresnet import WideResNet

__all__ = ["PreActResNet", "PreActResNet18", "SmallCNN", "WideResNet", "create_model", "MODEL_NAMES"]

MODEL_NAMES = ("preact18", "wrn34-10", "wrn28-10", "small-cnn")


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
