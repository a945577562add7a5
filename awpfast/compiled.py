"""``torch.compile`` for a whole AWP training step: the mode, the base optimizer's state, and
Dynamo's own counters.

The way to compile (docs/compile.md)::

    prime_base_state(opt)                      # SGD: no recompilation at step 2
    step = torch.compile(train_step, mode=compile_mode(device))

where ``train_step(x, y)`` runs the attack, ``awp.perturb(...)``, the descent backward and
``awp.step()``. What still breaks the graph, and why, is in docs/compile.md;
``DynamoEvents`` counts it (tests/test_compile.py, benchmarks/bench_compile.py).
"""
from __future__ import annotations

import logging
from typing import List, Optional

import torch

__all__ = ["compile_mode", "prime_base_state", "DynamoEvents", "DYNAMO_TRACES_WRAPPER"]


def compile_mode(device) -> str:
    """``"reduce-overhead"`` (CUDA graphs) on CUDA, ``"max-autotune-no-cudagraphs"`` elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else "max-autotune-no-cudagraphs"


def prime_base_state(optimizer: torch.optim.Optimizer) -> bool:
    """Create the base optimizer's per-parameter state before the first compiled step, as its
    first step would, so that the second step finds the same state and does not recompile
    (torch's SGD guards on ``len(self.state[p]) != 0``).

    Done for ``torch.optim.SGD`` with momentum and ``dampening == 0``: a zero
    ``momentum_buffer`` gives exactly the first step's buffer (``0·μ + g = g``, what SGD's own
    first step copies). Returns False, changing nothing, for any other optimizer or setting, or
    once state exists (then run the first step eagerly and compile from the second: docs/compile.md).
    Accepts an awpfast wrapper (its base optimizer is primed).
    """
    opt = getattr(optimizer, "optimizer", optimizer)
    if type(opt) is not torch.optim.SGD or any(len(s) for s in opt.state.values()):
        return False
    groups = opt.param_groups
    if not any(g["momentum"] for g in groups) or any(g["momentum"] and g["dampening"] != 0 for g in groups):
        return False
    for g in groups:
        if g["momentum"]:
            for p in g["params"]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return True


class DynamoEvents(logging.Handler):
    """Dynamo's own record of a compiled region, read from ``torch._dynamo.utils.counters`` and
    from its loggers (``torch._dynamo``, with the ``graph_breaks`` and ``recompiles`` artifacts)::

        with DynamoEvents() as ev:
            compiled_step(x, y)
        ev.graphs, ev.breaks, ev.fallbacks, ev.recompiles, ev.frames

    * ``graphs``: new unique graphs (``counters["stats"]["unique_graphs"]``);
    * ``frames``: frames Dynamo converted (``counters["frames"]["ok"]``; 0 on a warm step);
    * ``breaks``: ``(file:line, reason)`` of every graph break Dynamo logged;
    * ``fallbacks``: frames Dynamo gave up on and ran eagerly ("falling back to eager", "WON'T
      CONVERT"), as ``(file or frame, message)``;
    * ``recompiles``: the "Recompiling function ..." messages.

    Logging levels are restored on exit (``torch._logging.set_logs()``).
    """

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.breaks: List[tuple] = []
        self.fallbacks: List[tuple] = []
        self.recompiles: List[str] = []
        self.graphs = self.frames = 0
        self._start: Optional[tuple] = None

    @staticmethod
    def _counts():
        from torch._dynamo.utils import counters
        return counters["stats"]["unique_graphs"], counters["frames"]["ok"]

    def __enter__(self) -> "DynamoEvents":
        import torch._dynamo  # noqa: F401
        torch._logging.set_logs(dynamo=logging.INFO, graph_breaks=True, recompiles=True)
        self._muted = []  # recorded here, not printed: torch's own handlers are silenced inside
        for name, lg in list(logging.root.manager.loggerDict.items()):
            if name.startswith("torch") and isinstance(lg, logging.Logger):
                for h in lg.handlers:
                    self._muted.append((h, h.level))
                    h.setLevel(logging.CRITICAL + 1)
        logging.getLogger("torch._dynamo").addHandler(self)
        self._start = self._counts()
        return self

    def __exit__(self, *exc) -> None:
        g, f = self._counts()
        self.graphs, self.frames = g - self._start[0], f - self._start[1]
        logging.getLogger("torch._dynamo").removeHandler(self)
        for h, level in self._muted:
            h.setLevel(level)
        torch._logging.set_logs()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # a record that cannot format is not one of ours
            return
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        if not lines:
            return
        first = lines[0]
        if "falling back to eager" in msg or first.startswith("WON'T CONVERT"):
            self.fallbacks.append((_site(first), first[:200]))
        elif first.startswith("Graph break") and " user code at " in first:
            reason = lines[2] if len(lines) > 2 and lines[1].startswith("Graph Break Reason") else lines[-1]
            self.breaks.append((_site(first), reason[:200]))
        elif first.startswith("Recompiling function"):
            self.recompiles.append(" ".join(msg.split())[:400])

    def in_package(self, events, package: str = "/awpfast/") -> list:
        """The events whose site is a file of ``package`` (a path fragment)."""
        return [e for e in events if package in e[0].replace("\\", "/")]


def _site(line: str) -> str:
    """``file:line`` (or ``file line N``) named in a Dynamo message's first line."""
    for key in (" user code at ", "WON'T CONVERT "):
        if key in line:
            return line.split(key, 1)[1].strip()
    return line


# Dynamo before torch 2.13 (2.11 seen on an H100, 2026-11-27) cannot trace an attribute store
# on an Optimizer subclass ("Attempted setattr on a user-defined object that does not have an
# AttributeMutation mutation_type"). There the public methods run eagerly: a compiled training
# step gets a graph break at each call into awpfast and the same results; from 2.13 on they
# are traced (tests/test_compile.py checks both).
DYNAMO_TRACES_WRAPPER = torch.torch_version.TorchVersion(torch.__version__) >= "2.13"
_EAGER_METHODS = ("perturb", "restore", "step", "accumulate", "zero_grad", "set_gamma", "enable", "disable",
                  "first_step", "second_step")


def _eager_under_old_dynamo(cls, force: bool = False):
    """Keep ``cls``'s own public step methods out of Dynamo on torch < 2.13 (or when ``force``)."""
    if force or not DYNAMO_TRACES_WRAPPER:
        no_dynamo = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable
        for name in _EAGER_METHODS:
            fn = cls.__dict__.get(name)
            if callable(fn):
                setattr(cls, name, no_dynamo(fn))
    return cls
