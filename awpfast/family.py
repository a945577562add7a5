"""The old import path of SAM / ASAM and Box AWP: the rules live in :mod:`awpfast.rules`, next
to AWP, on the engine of :mod:`awpfast.optim`. ``from awpfast.family import SAM, BoxAWP`` keeps
working; ``awpfast.SAM`` / ``awpfast.BoxAWP`` are the same classes."""
from .rules import SAM, BoxAWP  # noqa: F401

__all__ = ["SAM", "BoxAWP"]
