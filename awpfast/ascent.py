"""Where the engine's ascent direction comes from, and the one it keeps.

:class:`AscentSource` is a base of :class:`awpfast.optim.WeightPerturbation` (this module imports
nothing above it; ``optim`` imports it). The direction of a ``perturb()`` comes from one of:

* the closures' loss (``perturb(closure)``): ``torch.autograd.grad`` on the model itself with
  BatchNorm statistics frozen; under FSDP2 an ordinary backward whose reduce-scattered ``.grad``
  shards are taken and every ``.grad`` put back;
* a *pending* direction: the sum of ``accumulate(closure)`` calls, or the weight gradient that an
  attack built with ``awp=`` computed in its last step (:meth:`AscentSource._add_direction`, the
  same path: the DDP all-reduce of ``ascent_sync="global"`` runs at ``perturb()`` unchanged);
* ``.grad`` (SAM, Box AWP: ``_grad_source``);
* the stored direction of ``ascent_every=K`` (K > 1): the synced direction of the last step that
  computed one, kept in one buffer the size of the selected weights (their local shards under
  FSDP2) and re-scaled to the current weights by the rule. It is part of ``state_dict()``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from .distributed import all_reduce_mean_flat, local_data
from .perturb import flat, flat_like

__all__ = ["AscentSource", "frozen_batchnorm_stats"]

Closure = Callable[[], torch.Tensor]


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


class AscentSource:
    """The ascent-direction half of the engine (see the module docstring). Uses the engine's
    ``_sel`` (:class:`awpfast.perturb.PerturbState`), ``_setting``, ``model``, ``_sync_selection``
    and ``_rule_active``."""

    def _init_ascent(self, ascent_every: int) -> None:
        self._pending: Optional[List[torch.Tensor]] = None   # accumulated ascent directions
        self._pending_gen = -1
        self.ascent_every = check_ascent_every(ascent_every)
        self._ascent_calls = 0      # perturb() calls with the rule active (ascent_every's clock)
        self._stored: Optional[List[torch.Tensor]] = None
        self._stored_key = None

    # ----------------------------------------------------------------- closures
    def _closure_directions(self, closure: Closure) -> List[torch.Tensor]:
        """Flat ascent directions of one closure (this rank's own; FSDP2's are already averaged
        over the ranks by its reduce-scatter). BatchNorm statistics and every ``.grad`` untouched."""
        if not callable(closure):
            raise TypeError(f"perturb() needs a closure returning the ascent loss, got {type(closure).__name__}")
        s = self._setting
        params = self._sel.params
        grads = None
        with torch.enable_grad(), frozen_batchnorm_stats(self.model), s.ascent_context():
            loss = closure()
            self._check_loss(loss)
            if s.kind == "fsdp2":
                grads = self._fsdp2_grads(loss)
        if grads is None:
            grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
        if all(g is None for g in grads):
            raise ValueError(
                "the ascent closure's loss is not connected to any selected parameter: compute the loss "
                "with the model passed to the wrapper, or change include=")
        return self._sel.flat_directions(grads)

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

    def _fsdp2_grads(self, loss: torch.Tensor):
        """FSDP2: autograd.grad cannot reach the sharded parameters, so run an ordinary backward
        (FSDP2 reduce-scatters the mean gradient into each rank's shard of ``.grad``), take the
        selected local shards, and put every parameter's ``.grad`` back as it was."""
        self._setting.check_group()
        ps = [p for p in self.model.parameters()]
        saved = [p.grad for p in ps]
        for p in ps:
            p.grad = None
        try:
            loss.reshape(()).backward()
            return [None if p.grad is None else local_data(p.grad) for p in self._sel.params]
        finally:
            for p, g in zip(ps, saved):
                p.grad = g

    def _directions(self, closures: Sequence[Closure]) -> List[torch.Tensor]:
        if len(closures) == 1:  # no loop around autograd.grad's graph break under torch.compile
            return self._closure_directions(closures[0])
        dirs = None
        for c in closures:
            d = self._closure_directions(c)
            if dirs is None:
                dirs = d
            else:
                torch._foreach_add_(dirs, d)
        return dirs

    def _synced(self, dirs: List[torch.Tensor]) -> List[torch.Tensor]:
        """``ascent_sync='global'`` under DDP: the ranks' mean, one all-reduce of one flat buffer."""
        if self._setting.averages_ascent:
            return all_reduce_mean_flat(dirs, self._setting)
        return dirs

    def _grad_directions(self) -> List[torch.Tensor]:
        """Flat directions from the selected parameters' ``.grad`` (their local shards under
        FSDP2); used in place, not copied, when the layouts match."""
        grads = [p.grad for p in self._sel.params]
        if all(g is None for g in grads):
            raise ValueError(
                f"{type(self).__name__}.perturb() without a closure takes the direction from .grad, and no "
                "selected parameter has a gradient: call loss.backward() first, or pass a closure returning the "
                "loss")
        if self._setting.sharded:
            grads = [None if g is None else local_data(g) for g in grads]
        return self._sel.flat_directions(grads)

    # ----------------------------------------------------------------- pending directions
    def _add_pending(self, d: List[torch.Tensor]) -> None:
        if self._pending is None or self._pending_gen != self._sel.generation:
            self._pending, self._pending_gen = d, self._sel.generation
        else:
            torch._foreach_add_(self._pending, d)

    def accumulate(self, closure: Closure) -> None:
        """Micro-batched ascent: add the ascent gradient of ``closure()``'s loss to a pending
        direction (no collective, weights untouched); the next ``perturb()`` called without a
        closure applies the sum. Give each micro-batch loss its weight in the full batch (e.g.
        ``loss / n_micro`` for equal sizes) if the sum should equal the full-batch gradient;
        the per-layer rule only uses its direction."""
        if self._sel.active:
            raise RuntimeError(f"{type(self).__name__}.accumulate() called while the weights are perturbed: "
                               "call step() or restore() first")
        self._sync_selection()
        if not self._sel.params:
            raise RuntimeError(f"{type(self).__name__}.accumulate(): no selected parameter requires grad")
        self._add_pending(self._closure_directions(closure))

    # ----------------------------------------------------------------- attack-sourced directions
    def _direction_request(self, who: str) -> Optional[List[torch.Tensor]]:
        """For an attack built with ``awp=self``: the selected parameters whose gradient its last
        step should return, or None when the next ``perturb()`` needs no new direction (rule
        inactive, e.g. gamma 0; a step of ``ascent_every`` that reuses the stored one; nothing
        selected)."""
        if self._setting.sharded:
            raise ValueError(
                f"{who}(awp=...) cannot source the ascent direction under FSDP2 (autograd.grad does not reach "
                "the sharded parameters): use a separate ascent, awp.perturb(closure), and ascent_every=K to "
                "compute it only every K steps")
        if self._sel.active:
            raise RuntimeError(f"{who}(awp=...) called while the weights are perturbed: call step() or restore() "
                               "first")
        self._sync_selection()
        if not self._sel.params or not self._rule_active() or self._reuse_due():
            return None
        return list(self._sel.params)

    def _add_direction(self, grads: Sequence[Optional[torch.Tensor]]) -> None:
        """The gradients of :meth:`_direction_request`'s parameters (None: not connected) join the
        pending direction, exactly as ``accumulate()``'s would."""
        if all(g is None for g in grads):
            raise ValueError("the attack's loss is not connected to any parameter the AWP wrapper perturbs: "
                             "build the wrapper on the attacked model")
        self._add_pending(self._sel.flat_directions(grads))

    # ----------------------------------------------------------------- ascent_every's stored direction
    def _stored_layout(self):
        return tuple(self._sel.names), tuple((t.shape, t.dtype, t.device) for t in self._sel.local)

    def _reuse_due(self) -> bool:
        """Whether the next active ``perturb()`` reuses the stored direction (``ascent_every > 1``,
        its clock not on a multiple of K, and a direction stored for the current selection)."""
        return (self.ascent_every > 1 and self._stored is not None
                and self._ascent_calls % self.ascent_every != 0 and self._stored_key == self._stored_layout())

    def _store(self, dirs: List[torch.Tensor]) -> None:
        """Copy the (synced) directions into the one stored buffer (allocated once)."""
        key = self._stored_layout()
        if (self._stored is None or len(self._stored) != len(dirs)
                or any(s.shape != d.shape or s.dtype != d.dtype or s.device != d.device
                       for s, d in zip(self._stored, dirs))):
            self._stored = [d.detach().clone() for d in dirs]
        else:
            torch._foreach_copy_(self._stored, [d.detach() for d in dirs])
        self._stored_key = key

    def _ascent_meta(self) -> dict:
        """The ``ascent_every`` entries of the state dict (none for ascent_every 1). The stored
        direction is saved shaped like the parameters; under FSDP2 it is gathered into whole
        tensors (a collective: every rank calls ``state_dict()``), so that it loads on any number
        of processes."""
        if self.ascent_every == 1:
            return {}
        out = {"ascent_every": self.ascent_every, "ascent_calls": self._ascent_calls, "direction": None}
        if self._stored is not None and self._stored_key == self._stored_layout():
            tensors = []
            for d, t, p in zip(self._stored, self._sel.local, self._sel.params):
                whole = torch.empty_like(t)
                flat(whole).copy_(d)
                if self._setting.sharded:
                    from torch.distributed.tensor import DTensor
                    whole = DTensor.from_local(whole, p.device_mesh, p.placements, shape=p.shape,
                                               stride=p.stride()).full_tensor()
                tensors.append(whole.detach().clone())
            out["direction"] = {"names": list(self._sel.names), "tensors": tensors}
        return out

    def _check_ascent_meta(self, meta: dict) -> Optional[List[torch.Tensor]]:
        """Validate a state dict's stored direction against this wrapper (before anything is
        loaded); returns its flat local tensors, or None. A one-line ValueError when it does not fit."""
        d = meta.get("direction")
        if d is None or self.ascent_every == 1:
            return None
        self._sync_selection()
        names, tensors = d.get("names"), d.get("tensors")
        if names != list(self._sel.names) or len(tensors) != len(names):
            raise ValueError(f"{type(self).__name__}.load_state_dict: the stored ascent direction is for the "
                             f"parameters {names}, this wrapper perturbs {list(self._sel.names)}: load it into a "
                             "wrapper with the same selection")
        out = []
        for n, v, t, p in zip(names, tensors, self._sel.local, self._sel.params):
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"{type(self).__name__}.load_state_dict: the stored ascent direction of {n} has "
                                 f"shape {tuple(v.shape)}, the parameter {tuple(p.shape)}: load it into the same "
                                 "architecture")
            v = v.to(device=t.device, dtype=t.dtype)
            if self._setting.sharded:
                from torch.distributed.tensor import distribute_tensor
                v = distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None).to_local()
            out.append(flat_like(v, t).clone())
        return out

    def _load_ascent_meta(self, meta: dict, direction: Optional[List[torch.Tensor]]) -> None:
        self._ascent_calls = int(meta.get("ascent_calls", 0))
        self._stored = direction
        self._stored_key = None if direction is None else self._stored_layout()
