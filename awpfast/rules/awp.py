"""AWP (Wu, Xia & Wang, NeurIPS 2020): the wrapper and its math.

Per selected layer (Frobenius norms of whole tensors), ``g`` the gradient of the closure's loss::

    v_l = gamma * ||w_l|| * g_l / (||g_l|| + 1e-20)

No proxy model: the ascent gradient is taken on the model itself with BatchNorm running
statistics frozen. Multi-step AWP (``steps=K``) takes K such steps of size ``eta`` and projects
onto ``||v_l|| <= gamma ||w_l||``.

The functional core, :func:`awp_perturb` (first step) and :func:`awp_ascent_step` (later steps),
works on the engine's flat per-(device, dtype) tensor lists (:class:`awpfast.perturb.PerturbState`)
through the seam's fused ops; under FSDP2 the same functions take the per-layer norms from one
all-reduce of the shards' partial sums and apply them with ``ops.add_scaled_``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn

from .. import ops as _ops
from ..compiled import _eager_under_old_dynamo
from ..ops._util import acc_dtype
from ..optim import WeightPerturbation
from ..perturb import PerturbState, join_norms
from ._check import check_gamma, is_number

__all__ = ["AWP", "awp_perturb", "awp_ascent_step", "AWPSizes"]


@dataclass
class AWPSizes:
    """One (device, dtype) group's per-layer radius and step size (selection order within the group)."""
    gammas: List[float]
    etas: List[float]
    project_first: bool                    # a first step larger than a radius: project it
    gammas_t: Optional[torch.Tensor] = None  # the same on the device (sharded path)
    etas_t: Optional[torch.Tensor] = None
    wnorms: Optional[torch.Tensor] = None    # global ||w_l|| of the backups (sharded path)


def split_sizes(state: PerturbState, gammas, etas) -> List[AWPSizes]:
    """Per-selected-parameter ``gammas`` / ``etas`` split by the state's groups (tensors for FSDP2)."""
    out = []
    for g in state.groups:  # loops, not comprehensions: see PerturbState.ensure_buffers
        gs, es, first = [], [], False
        for i in g.index:
            gs.append(gammas[i])
            es.append(etas[i])
            first = first or etas[i] > gammas[i]
        sz = AWPSizes(gs, es, first)
        if state.reduce is not None:
            sz.gammas_t = torch.tensor(gs, dtype=torch.float64, device=g.device)
            sz.etas_t = torch.tensor(es, dtype=torch.float64, device=g.device)
        out.append(sz)
    return out


# ----------------------------------------------------------------------------- the functional core
def awp_perturb(state: PerturbState, sizes: List[AWPSizes], dirs, eps: float) -> torch.Tensor:
    """First ascent step: backups <- w, w += eta_l ||w_l|| d_l / (||d_l|| + eps) per layer (``dirs``:
    the flat directions of ``state.flat_directions``); a first step larger than the radius is
    projected. Returns every direction norm (one vector). The caller has run ``state.refresh()``
    since the parameters last changed."""
    state.begin()
    if state.reduce is not None:
        try:
            return _perturb_sharded(state, sizes, dirs, eps)
        except BaseException:
            state.restore()  # after a failed projection; a no-op when nothing is perturbed
            raise
    done, norms = [], []
    try:
        for g, sz in zip(state.groups, sizes):
            state.ensure_buffers(g)
            be = state.backend_of(g)
            deltas = g.deltas if state.store_deltas else None
            norms.append(be.perturb_(g.params, state.group_dirs(dirs, g), sz.etas, eps, g.backups, deltas))
            done.append(g)
            if sz.project_first:
                be.project_(g.params, g.backups, sz.gammas)
                state.refresh_deltas(g)
    except BaseException:
        state.restore_groups(done)
        raise
    state.active = True
    return join_norms(norms)


def awp_ascent_step(state: PerturbState, sizes: List[AWPSizes], dirs, eps: float) -> torch.Tensor:
    """A later multi-step ascent step around the backed-up weights, with projection."""
    try:
        if state.reduce is not None:
            return _ascent_step_sharded(state, sizes, dirs, eps)
        norms = []
        for g, sz in zip(state.groups, sizes):
            be = state.backend_of(g)
            norms.append(be.ascent_step_(g.params, g.backups, state.group_dirs(dirs, g), sz.etas, sz.gammas, eps))
            state.refresh_deltas(g)
    except BaseException:
        state.restore()
        raise
    return join_norms(norms)


def _project_sharded(state: PerturbState, sizes: List[AWPSizes]) -> None:
    """params <- w + v * min(1, gamma_l ||w_l|| / ||v_l||), v = params - w (global norms)."""
    vs = [torch._foreach_sub(g.params, g.backups) for g in state.groups]
    (vn,) = state.global_norms([vs])
    for g, sz, v, n in zip(state.groups, sizes, vs, vn):
        radius = sz.gammas_t * sz.wnorms
        factor = torch.where(n > radius, radius / torch.where(n > 0, n, torch.ones_like(n)), torch.ones_like(n))
        _ops.add_scaled_(g.params, v, factor.to(acc_dtype(g.dtype)), base=g.backups,
                         deltas=g.deltas if state.store_deltas else None, backend=state.backend)


def _perturb_sharded(state: PerturbState, sizes: List[AWPSizes], dirs, eps) -> torch.Tensor:
    ds = [state.group_dirs(dirs, g) for g in state.groups]
    wn, dn = state.global_norms([[g.params for g in state.groups], ds])
    done = []
    try:
        for g, sz, d, w, n in zip(state.groups, sizes, ds, wn, dn):
            state.ensure_buffers(g)
            sz.wnorms = w
            scale = (sz.etas_t * w / (n + eps)).to(acc_dtype(g.dtype))
            _ops.add_scaled_(g.params, d, scale, backups=g.backups,
                             deltas=g.deltas if state.store_deltas else None, backend=state.backend)
            done.append(g)
    except BaseException:
        state.restore_groups(done)
        raise
    state.active = True
    if any(sz.project_first for sz in sizes):
        _project_sharded(state, sizes)
    return join_norms(dn)


def _ascent_step_sharded(state: PerturbState, sizes: List[AWPSizes], dirs, eps) -> torch.Tensor:
    ds = [state.group_dirs(dirs, g) for g in state.groups]
    (dn,) = state.global_norms([ds])
    for g, sz, d, n in zip(state.groups, sizes, ds, dn):
        scale = (sz.etas_t * sz.wnorms / (n + eps)).to(acc_dtype(g.dtype))
        _ops.add_scaled_(g.params, d, scale, backend=state.backend)
    _project_sharded(state, sizes)
    return join_norms(dn)


# ----------------------------------------------------------------------------- the wrapper
class AWP(WeightPerturbation):
    """Adversarial Weight Perturbation around a base optimizer.

    Args:
        optimizer: the base ``torch.optim`` optimizer (its ``param_groups`` and ``state`` are shared).
        model: the module whose weights are perturbed: a plain module, a ``DistributedDataParallel``
            wrapper, or a module whose blocks were ``fully_shard``-ed (FSDP2); detected automatically.
        gamma: relative perturbation size ``||v_l|| / ||w_l||`` in [0, 1]; the default of each param
            group's ``awp_gamma`` (change it there for a schedule or warm-up; 0 skips the ascent pass).
        steps: ascent steps; ``> 1`` is multi-step AWP with projection onto ``||v_l|| <= gamma ||w_l||``.
        step_size: ascent step size ``eta`` (relative, like gamma); default ``gamma`` for one step and
            ``2.5 * gamma / steps`` for several.
        include: ``(name, param) -> bool`` choosing the perturbed parameters; default: the reference
            rule (``ndim > 1`` and ``"weight"`` in the name). Only parameters the optimizer holds and
            that require grad are perturbed.
        restore: ``"after_step"`` (reference order: step at ``w + v``, then subtract ``v``) or
            ``"before_step"`` (restore ``w`` bit-exactly from the backup, then step). Default
            ``"after_step"``, except ``"before_step"`` for ``ascent_sync="local"`` on several DDP ranks
            (where ``"after_step"`` is refused: the replicas would drift apart).
        backend: seam backend (``reference``, ``foreach``, ``triton``, ``native``); default: the
            ``AWPFAST_BACKEND`` environment variable, else the best for the device.
        nonfinite: ``"skip"`` (default: a non-finite ascent gradient skips this step's perturbation,
            with a warning, counted in ``skipped_steps``) or ``"raise"``. Eagerly the check is one
            host sync per ``perturb()``; inside ``torch.compile`` or a CUDA-graph capture the skip
            happens on the device (no sync, no graph break, no warning; still counted in
            ``skipped_steps``).
        ascent_sync: ``"global"`` (default: the ascent gradient of the global batch, averaged over the
            ranks with one all-reduce under DDP, so the perturbation equals single-process AWP on the
            whole batch and is identical on every rank) or ``"local"`` (each DDP rank uses its own
            batch's gradient, no collective). FSDP2 is always global. Without DDP/FSDP2: no effect.
        eps: the ``1e-20`` of the reference.
        ascent_every: ``K >= 1``. 1 (default): a fresh ascent direction every step. ``K > 1``: the
            direction is computed on every K-th ``perturb()`` with gamma > 0 (counted from the first;
            also whenever none is stored), and the steps in between call no closure and perturb along
            the stored one re-scaled to the current weights, ``v_l = gamma ||w_l|| d_l / ||d_l||``.
            The stored direction is one copy of the selected weights (the synced one under DDP, local
            shards under FSDP2), saved in ``state_dict()`` for an exact resume. Needs ``steps=1``.
        ascent_fraction: ``F`` in (0, 1]. Below 1 the ascent pass runs on a sub-batch: the closure
            takes one argument, ``pick``, and returns the loss on ``pick(x_adv, y)`` (the same
            ``ceil(F * n)`` rows of each tensor, drawn without replacement from the wrapper's own
            generator, a fresh draw per closure call); about F of a forward + backward. The
            generator is seeded with ``ascent_seed`` (default ``torch.initial_seed()``) and saved in
            ``state_dict()``. Under DDP every rank draws the same row positions of its own batch.
        ascent: ``"gradient"`` (default: the closure's, an accumulated or an attack's gradient) or
            ``"momentum"``: the base optimizer's momentum of each layer (SGD's ``momentum_buffer``,
            Adam's ``exp_avg``), re-scaled per layer as above; ``perturb()`` takes no closure and runs
            no ascent pass; before the base optimizer's first step there is no momentum and the step
            is not perturbed (warned once). Not an approximation of AWP's direction (see
            docs/reproduction.md); it regularises like momentum-SAM.

    The direction can also come from the attack itself: ``PGD(model, ..., awp=awp)`` (or
    :class:`awpfast.attacks.TRADESAttack`) computes the selected weights' gradient of its own loss
    in its last step, and ``awp.perturb()`` without a closure applies it (no ascent pass).
    """

    rule_name = "AWP"
    _size_key_name = "awp_gamma"
    _uncompared = ("default_gamma",)  # the param groups carry the gammas

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, gamma: float = 0.01, *,
                 steps: int = 1, step_size: Optional[float] = None,
                 include: Optional[Callable[[str, nn.Parameter], bool]] = None,
                 restore: Optional[str] = None, backend: Optional[str] = None,
                 nonfinite: str = "skip", ascent_sync: str = "global", eps: float = 1e-20,
                 ascent_every: int = 1, ascent_fraction: float = 1.0, ascent_seed: Optional[int] = None,
                 ascent: str = "gradient"):
        check_gamma(gamma, "gamma")
        if type(ascent_every) is int and ascent_every > 1 and steps != 1:
            raise ValueError(f"ascent_every={ascent_every} re-uses a one-step direction: use steps=1 (got steps={steps})")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}; use steps=1 for the reference AWP")
        if step_size is not None and not (is_number(step_size) and 0 < step_size <= 1):
            raise ValueError(f"step_size must be a number > 0 and <= 1 (relative to each layer's weights, like gamma; "
                             f"or None for the default), got {step_size!r}")
        if not (is_number(eps) and 0 <= eps < float("inf")):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.steps, self.step_size, self.eps = steps, step_size, float(eps)
        self.passes = steps
        self._default_gamma = float(gamma)
        super().__init__(optimizer, model, include=include, restore=restore, backend=backend,
                         nonfinite=nonfinite, ascent_sync=ascent_sync, extra_defaults={"awp_gamma": float(gamma)},
                         ascent_every=ascent_every, ascent_fraction=ascent_fraction, ascent_seed=ascent_seed,
                         ascent=ascent)
        self._size_key, self._any_gamma, self._sizes = None, True, []
        self._update_sizes()  # now, eagerly: a compiled first step then finds them ready (no recompile)

    def __repr__(self):
        every = getattr(self, "ascent_every", 1)
        every = f", ascent_every={every}" if every > 1 else ""
        if getattr(self, "ascent_fraction", 1.0) < 1:
            every += f", ascent_fraction={self.ascent_fraction:g}"
        if getattr(self, "ascent_source", "gradient") != "gradient":
            every += f", ascent={self.ascent_source!r}"
        return (f"AWP(gamma={[g.get('awp_gamma') for g in self.param_groups]}, steps={self.steps}{every}, "
                f"restore={self.restore_mode!r}, layers={len(self._sel.params)}, "
                f"setting={self._setting.kind}/{self._setting.sync},\n  base={self.optimizer!r})")

    def set_gamma(self, gamma: float) -> None:
        """Set ``awp_gamma`` of every param group (e.g. for a warm-up)."""
        self._set_all("awp_gamma", gamma, check_gamma)

    # ----------------------------------------------------------------- the engine's hooks
    def _rule_active(self) -> bool:
        return self._update_sizes()

    def _rule_apply(self, dirs, first: bool) -> torch.Tensor:
        if first:
            return awp_perturb(self._sel, self._sizes, dirs, self.eps)
        return awp_ascent_step(self._sel, self._sizes, dirs, self.eps)

    def _rule_config(self) -> dict:
        return {"steps": self.steps, "step_size": self.step_size, "default_gamma": self._default_gamma}

    def _rule_load(self, meta: Optional[dict]) -> None:
        self._size_key = None

    # ----------------------------------------------------------------- per-layer gamma
    def _update_sizes(self) -> bool:
        """Push the per-layer gamma and step size to the groups when a param group's ``awp_gamma``,
        the groups themselves, the selection or its layout changed; returns whether any gamma is
        > 0. The steady state is one small tuple comparison per step, no loop over layers."""
        key = self._group_values_key("awp_gamma")
        if key == self._size_key:
            return self._any_gamma
        gammas = self._per_parameter("awp_gamma", self._default_gamma, check_gamma, "awp_gamma in a param group")
        k = self.steps
        etas = []
        for g in gammas:
            etas.append(self.step_size if self.step_size is not None else (g if k == 1 else 2.5 * g / k))
        self._sizes = split_sizes(self._sel, gammas, etas)
        self._size_key, self._any_gamma = key, any(gammas)
        return self._any_gamma


_eager_under_old_dynamo(AWP)
