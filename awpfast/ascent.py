"""Where the engine's ascent direction comes from, and the one it keeps.

:class:`Ascent` is an object that :class:`awpfast.optim.WeightPerturbation` holds (this module imports
nothing above it; ``optim`` imports it). The direction of a ``perturb()`` comes from one of:

* the closures' loss (``perturb(closure)``): ``torch.autograd.grad`` on the model itself with
  BatchNorm statistics frozen; under FSDP2 an ordinary backward whose reduce-scattered ``.grad``
  shards are taken and every ``.grad`` put back;
* a *pending* direction: the sum of ``accumulate(closure)`` calls, or the weight gradient that an
  attack built with ``awp=`` computed in its last step (:meth:`Ascent.add_direction`, the
  same path: the DDP all-reduce of ``ascent_sync="global"`` runs at ``perturb()`` unchanged);
* ``.grad`` (SAM, Box AWP: ``_grad_source``);
* the stored direction of ``ascent_every=K`` (K > 1): the synced direction of the last step that
  computed one, kept in one buffer the size of the selected weights (their local shards under
  FSDP2) and re-scaled to the current weights by the rule. It is part of ``state_dict()``;
* a sub-batch (``ascent_fraction=F < 1``): the closure takes one argument, ``pick``, and computes its
  loss on ``pick(x_adv, y)``, the same ``ceil(F * n)`` rows of each tensor, drawn without
  replacement from the wrapper's own generator (seeded, saved in ``state_dict()``: reproducible and
  resumable). The pass costs about F of a full-batch forward + backward;
* the base optimizer's momentum (``ascent="momentum"``): SGD's ``momentum_buffer`` or Adam's
  ``exp_avg`` of each selected weight, no extra pass (``perturb()`` without a closure).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from .distributed import all_reduce_mean_flat, local_data
from .perturb import flat, flat_like

__all__ = ["Ascent", "RowPicker", "backward_in_closure_advice", "frozen_batchnorm_stats", "ASCENT_SOURCES"]

Closure = Callable[[], torch.Tensor]
ASCENT_SOURCES = ("gradient", "momentum")  # AWP(ascent=...): a closure's (or the attack's) gradient, or momentum
_MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")  # SGD, Adam/AdamW/NAdam/RAdam


class RowPicker:
    """The ``pick`` argument of a sub-batch ascent closure: ``pick(a, b, ...)`` returns the same
    rows of every tensor (one tensor: the tensor itself). The rows are drawn on the first call,
    ``ceil(fraction * n)`` of the ``n`` rows without replacement, in ascending order, from
    ``generator``; ``fraction=1`` (or ``generator=None``) picks every row and draws nothing."""

    def __init__(self, fraction: float = 1.0, generator: Optional[torch.Generator] = None):
        self.fraction, self.generator = fraction, generator
        self.rows: Optional[torch.Tensor] = None
        self.n: Optional[int] = None

    def __call__(self, *tensors: torch.Tensor):
        if not tensors or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in tensors):
            raise TypeError("pick(...) takes the batch tensors (e.g. pick(x_adv, y)): tensors with a batch "
                            "dimension")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError(f"pick(...) got tensors of different batch sizes {[t.shape[0] for t in tensors]}: "
                             "pass the tensors of one batch")
        if self.n is None:
            self.n = n
            if self.generator is not None and self.fraction < 1:
                k = max(1, math.ceil(self.fraction * n - 1e-9))
                self.rows = torch.randperm(n, generator=self.generator)[:k].sort().values
        elif n != self.n:
            raise ValueError(f"pick(...) was called with batches of {self.n} and {n} rows in one closure call: "
                             "pass the tensors of one batch")
        if self.rows is None:
            out = tensors
        else:
            out = tuple(t.index_select(0, self.rows.to(t.device)) for t in tensors)
        return out[0] if len(out) == 1 else out


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module):
    """Inside: BatchNorm layers (SyncBatchNorm included) in train mode normalize with batch
    statistics as usual but update neither running_mean/var nor num_batches_tracked.
    Eval-mode layers are unaffected."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def check_ascent_every(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ascent_every must be an integer >= 1 (1: a fresh ascent direction every step), "
                         f"got {value!r}")
    return value


def check_ascent_fraction(value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < float(value) <= 1
    if not ok:
        raise ValueError(f"ascent_fraction must be a number in (0, 1] (the share of the batch the ascent pass "
                         f"uses; 1: all of it), got {value!r}")
    return float(value)


def _check_has_momentum(opt: torch.optim.Optimizer) -> None:
    d = opt.defaults
    if "betas" in d or ("momentum" in d and all(float(g.get("momentum", 0)) > 0 for g in opt.param_groups)):
        return
    raise ValueError(f"ascent='momentum' takes the direction from the base optimizer's momentum, and this "
                     f"{type(opt).__name__} keeps none: use SGD with momentum > 0 or Adam/AdamW, or "
                     "ascent='gradient'")


def backward_in_closure_advice(who, e: RuntimeError) -> RuntimeError:
    """The error for a closure that ran ``backward()`` itself (``e``: autograd's "backward through the
    graph a second time"), or ``e`` unchanged for any other RuntimeError."""
    if "backward through the graph a second time" not in str(e):
        return e
    return RuntimeError(f"{type(who).__name__}: the ascent closure called backward() itself (a torch.optim "
                        "closure): an ascent closure only returns the loss, e.g. lambda: "
                        "F.cross_entropy(model(x_adv), y); the wrapper takes the gradient and leaves .grad "
                        "alone (the closure's backward has added to .grad: zero it)")


class Ascent:
    """The ascent-direction half of the engine (see the module docstring): an object the engine
    (:class:`awpfast.optim.WeightPerturbation`) holds and calls. It reads the engine's selection
    (``sel``, a :class:`awpfast.perturb.PerturbState`), its distributed ``setting``, the ``model`` and the
    base ``optimizer`` (momentum buffers); ``who`` names the wrapper in messages. It keeps the pending
    direction, ``ascent_every``'s clock and stored direction, and the sub-batch generator."""

    def __init__(self, sel, setting, model: nn.Module, optimizer: torch.optim.Optimizer, who: str,
                 every: int = 1, fraction: float = 1.0, seed: Optional[int] = None, source: str = "gradient"):
        self.sel, self.setting, self.model, self.optimizer, self.who = sel, setting, model, optimizer, who
        self.pending: Optional[List[torch.Tensor]] = None   # accumulated ascent directions
        self.pending_gen = -1
        self.every = check_ascent_every(every)
        self.calls = 0      # perturb() calls with the rule active (ascent_every's clock)
        self.stored: Optional[List[torch.Tensor]] = None
        self.stored_key = None
        self.fraction = check_ascent_fraction(fraction)
        self.rows_gen: Optional[torch.Generator] = None
        if self.fraction < 1:
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
                raise ValueError(f"ascent_seed must be an integer in [0, 2**63) or None, got {seed!r}")
            self.rows_gen = torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)
        if source not in ASCENT_SOURCES:
            raise ValueError(f"ascent must be one of {', '.join(map(repr, ASCENT_SOURCES))}, got {source!r}")
        self.source = source
        if source == "momentum":
            if self.fraction < 1 or self.every > 1:
                raise ValueError("ascent='momentum' runs no ascent pass: drop ascent_fraction / ascent_every")
            _check_has_momentum(self.optimizer)

    # ----------------------------------------------------------------- closures
    def call_closure(self, closure: Closure, full: bool = False):
        """``closure()``, or with ``ascent_fraction < 1`` ``closure(pick)`` (``full``: a ``pick`` that
        keeps every row and draws nothing)."""
        if self.fraction >= 1:
            return closure()
        pick = RowPicker() if full else RowPicker(self.fraction, self.rows_gen)
        try:
            loss = closure(pick)
        except TypeError as e:
            if pick.n is None and "positional argument" in str(e):
                raise TypeError(f"{self.who}(ascent_fraction={self.fraction:g}) calls the ascent "
                                "closure with one argument, pick, that selects the sub-batch: write it as "
                                "lambda pick: loss_fn(model(pick(x_adv)), pick(y)) (or pick(x_adv, y))") from None
            raise
        if pick.n is None and not full:
            raise ValueError(f"{self.who}(ascent_fraction={self.fraction:g}): the ascent closure "
                             "never called pick(...), so the pass ran on the whole batch; compute the loss on "
                             "pick(x_adv, y)")
        return loss

    def closure_directions(self, closure: Closure, full: bool = False) -> List[torch.Tensor]:
        """Flat ascent directions of one closure (this rank's own; FSDP2's are already averaged
        over the ranks by its reduce-scatter). BatchNorm statistics and every ``.grad`` untouched.
        ``full``: a sub-batch closure gets every row (see :meth:`_call_closure`)."""
        if not callable(closure):
            raise TypeError(f"perturb() needs a closure returning the ascent loss, got {type(closure).__name__}")
        s = self.setting
        params = self.sel.params
        grads = None
        # FSDP2: every parameter's .grad is set aside *before* the closure's forward, while the
        # modules hold their sharded parameters (after the forward a unit that does not reshard,
        # such as the root, holds unsharded ones, and their shards' .grad would be accumulated into)
        saved = self.fsdp2_set_aside_grads() if s.kind == "fsdp2" else None
        try:
            with torch.enable_grad(), frozen_batchnorm_stats(self.model), s.ascent_context():
                loss = self.call_closure(closure, full)
                self._check_loss(loss)
                if s.kind == "fsdp2":
                    grads = self.fsdp2_grads(loss)
        finally:
            if saved is not None:
                for p, g in saved:
                    p.grad = g
        if grads is None:
            grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
        if all(g is None for g in grads):
            raise ValueError(
                "the ascent closure's loss is not connected to any selected parameter: compute the loss "
                "with the model passed to the wrapper, or change include=")
        return self.sel.flat_directions(grads)

    @staticmethod
    def _check_loss(loss) -> None:
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"the AWP closure returned {type(loss).__name__}, not a tensor; return the ascent loss, "
                "e.g. lambda: F.cross_entropy(model(x_adv), y)")
        if loss.numel() != 1:
            raise ValueError(f"the AWP closure must return a scalar loss, got shape {tuple(loss.shape)}; "
                             "reduce it (e.g. .mean())")
        if not loss.requires_grad:
            raise ValueError(
                "the AWP closure's loss does not depend on the selected parameters (it has no grad_fn): "
                "compute it with gradients enabled and without .detach()")

    def fsdp2_set_aside_grads(self) -> list:
        """FSDP2: ``[(sharded parameter, its .grad)]`` for every parameter, each ``.grad`` set to None.
        The sharded parameters are the FSDP units' own (``reshard()`` first where a unit still holds
        its unsharded ones, e.g. after a forward without backward)."""
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
        ps = list(self.model.parameters())
        if not all(isinstance(p, DTensor) for p in ps):
            for m in self.model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
            ps = list(self.model.parameters())
        saved = [(p, p.grad) for p in ps]
        for p in ps:
            p.grad = None
        return saved

    def fsdp2_grads(self, loss: torch.Tensor):
        """FSDP2: autograd.grad cannot reach the sharded parameters, so run an ordinary backward
        (FSDP2 reduce-scatters the mean gradient into each rank's shard of ``.grad``, set aside and
        cleared by :meth:`_fsdp2_set_aside_grads` before the forward) and take the selected local
        shards; the caller puts every ``.grad`` back."""
        self.setting.check_group()
        loss.reshape(()).backward()
        return [None if p.grad is None else local_data(p.grad) for p in self.sel.params]

    def directions(self, closures: Sequence[Closure]) -> List[torch.Tensor]:
        if len(closures) == 1:  # no loop around autograd.grad's graph break under torch.compile
            return self.closure_directions(closures[0])
        dirs = None
        for c in closures:
            d = self.closure_directions(c)
            if dirs is None:
                dirs = d
            else:
                torch._foreach_add_(dirs, d)
        return dirs

    def synced(self, dirs: List[torch.Tensor]) -> List[torch.Tensor]:
        """``ascent_sync='global'`` under DDP: the ranks' mean, one all-reduce of one flat buffer."""
        if self.setting.averages_ascent:
            return all_reduce_mean_flat(dirs, self.setting)
        return dirs

    def grad_directions(self) -> List[torch.Tensor]:
        """Flat directions from the selected parameters' ``.grad`` (their local shards under
        FSDP2); used in place, not copied, when the layouts match."""
        grads = [p.grad for p in self.sel.params]
        if all(g is None for g in grads):
            raise ValueError(
                f"{self.who}.perturb() without a closure takes the direction from .grad, and no "
                "selected parameter has a gradient: call loss.backward() first, or pass a closure returning the "
                "loss")
        if self.setting.sharded:
            grads = [None if g is None else local_data(g) for g in grads]
        return self.sel.flat_directions(grads)

    def momentum_directions(self) -> Optional[List[torch.Tensor]]:
        """Flat directions from the base optimizer's momentum of each selected weight (SGD's
        ``momentum_buffer``, Adam's ``exp_avg``; their local shards under FSDP2); None before the
        first base step made one. No collective: the buffers are built from synced gradients."""
        grads, found = [], False
        for p in self.sel.params:
            st = self.optimizer.state.get(p, {})
            buf = next((st[k] for k in _MOMENTUM_KEYS if isinstance(st.get(k), torch.Tensor)), None)
            found = found or buf is not None
            grads.append(None if buf is None else (local_data(buf) if self.setting.sharded else buf))
        return self.sel.flat_directions(grads) if found else None

    # ----------------------------------------------------------------- pending directions
    def add_pending(self, d: List[torch.Tensor]) -> None:
        if self.pending is None or self.pending_gen != self.sel.generation:
            self.pending, self.pending_gen = d, self.sel.generation
        else:
            torch._foreach_add_(self.pending, d)

    # ----------------------------------------------------------------- attack-sourced directions
    def add_direction(self, grads: Sequence[Optional[torch.Tensor]]) -> None:
        """The gradients of :meth:`direction_request`'s parameters (None: not connected) join the
        pending direction, exactly as ``accumulate()``'s would."""
        if all(g is None for g in grads):
            raise ValueError("the attack's loss is not connected to any parameter the AWP wrapper perturbs: "
                             "build the wrapper on the attacked model")
        self.add_pending(self.sel.flat_directions(grads))

    # ----------------------------------------------------------------- ascent_every's stored direction
    def stored_layout(self):
        return tuple(self.sel.names), tuple((t.shape, t.dtype, t.device) for t in self.sel.local)

    def reuse_due(self) -> bool:
        """Whether the next active ``perturb()`` reuses the stored direction (``ascent_every > 1``,
        its clock not on a multiple of K, and a direction stored for the current selection)."""
        return (self.every > 1 and self.stored is not None
                and self.calls % self.every != 0 and self.stored_key == self.stored_layout())

    def store(self, dirs: List[torch.Tensor]) -> None:
        """Copy the (synced) directions into the one stored buffer (allocated once)."""
        key = self.stored_layout()
        if (self.stored is None or len(self.stored) != len(dirs)
                or any(s.shape != d.shape or s.dtype != d.dtype or s.device != d.device
                       for s, d in zip(self.stored, dirs))):
            self.stored = [d.detach().clone() for d in dirs]
        else:
            torch._foreach_copy_(self.stored, [d.detach() for d in dirs])
        self.stored_key = key

    def meta(self) -> dict:
        """The ``ascent_every`` entries of the state dict (none for ascent_every 1), the sub-batch
        generator's state and the ascent source. The stored
        direction is saved shaped like the parameters; under FSDP2 it is gathered into whole
        tensors (a collective: every rank calls ``state_dict()``), so that it loads on any number
        of processes."""
        out = {}
        if self.fraction < 1:
            out.update(ascent_fraction=self.fraction, ascent_rng=self.rows_gen.get_state())
        if self.source != "gradient":
            out["ascent"] = self.source
        if self.every == 1:
            return out
        out.update({"ascent_every": self.every, "ascent_calls": self.calls, "direction": None})
        if self.stored is not None and self.stored_key == self.stored_layout():
            tensors = []
            for d, t, p in zip(self.stored, self.sel.local, self.sel.params):
                whole = torch.empty_like(t)
                flat(whole).copy_(d)
                if self.setting.sharded:
                    from torch.distributed.tensor import DTensor
                    whole = DTensor.from_local(whole, p.device_mesh, p.placements, shape=p.shape,
                                               stride=p.stride()).full_tensor()
                tensors.append(whole.detach().clone())
            out["direction"] = {"names": list(self.sel.names), "tensors": tensors}
        return out

    def check_meta(self, meta: dict, sync: Callable[[], None]) -> Optional[List[torch.Tensor]]:
        """Validate a state dict's stored direction against this wrapper (before anything is
        loaded; ``sync``: the engine's selection refresh, run first); returns its flat local tensors,
        or None. A one-line ValueError when it does not fit."""
        d = meta.get("direction")
        if d is None or self.every == 1:
            return None
        sync()
        names, tensors = d.get("names"), d.get("tensors")
        if names != list(self.sel.names) or len(tensors) != len(names):
            raise ValueError(f"{self.who}.load_state_dict: the stored ascent direction is for the "
                             f"parameters {names}, this wrapper perturbs {list(self.sel.names)}: load it into a "
                             "wrapper with the same selection")
        out = []
        for n, v, t, p in zip(names, tensors, self.sel.local, self.sel.params):
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"{self.who}.load_state_dict: the stored ascent direction of {n} has "
                                 f"shape {tuple(v.shape)}, the parameter {tuple(p.shape)}: load it into the same "
                                 "architecture")
            v = v.to(device=t.device, dtype=t.dtype)
            if self.setting.sharded:
                from torch.distributed.tensor import distribute_tensor
                v = distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None).to_local()
            out.append(flat_like(v, t).clone())
        return out

    def load_meta(self, meta: dict, direction: Optional[List[torch.Tensor]]) -> None:
        rng = meta.get("ascent_rng")
        if self.rows_gen is not None and isinstance(rng, torch.Tensor):
            self.rows_gen.set_state(rng)
        self.calls = int(meta.get("ascent_calls", 0))
        self.stored = direction
        self.stored_key = None if direction is None else self.stored_layout()
