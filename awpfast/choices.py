"""The names awpfast's options choose from, in one torch-free module at the bottom of the house:
the modules that implement them import these tuples, and the CLIs can parse and validate a command
line without importing torch (bad input is answered at once)."""

__all__ = ["METHODS", "FORWARD_ORDERS", "L2_ORDERS", "DATASETS", "PAD_MODES", "MODEL_NAMES", "INPUT_NORM_NAMES",
           "BACKENDS", "DTYPE_NAMES"]

METHODS = ("at", "trades", "mart")                      # awpfast.losses
FORWARD_ORDERS = ("ours", "reference")                  # awpfast.losses: how BatchNorm is fed at w + v
L2_ORDERS = ("renorm-clamp", "clamp-renorm")            # awpfast.attacks: the L2 TRADES attack's projection order
DATASETS = ("digits", "cifar10", "synthetic")           # awpfast.data
PAD_MODES = ("reflect", "zeros")                        # awpfast.data: random-crop padding
MODEL_NAMES = ("preact18", "wrn34-10", "wrn28-10", "small-cnn")  # awpfast.models
INPUT_NORM_NAMES = ("none", "cifar10")                  # awpfast.models.INPUT_NORMS
BACKENDS = ("reference", "foreach", "triton", "native")  # awpfast.ops
DTYPE_NAMES = ("float32", "float64")                    # awpfast-train --dtype
