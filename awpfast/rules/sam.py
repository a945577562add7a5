"""SAM (Foret et al. 2021) and adaptive SAM / ASAM (Kwon et al. 2021): the wrapper and its math.

**SAM**::

    v = rho * g / (||g|| + 1e-12)                       one global norm over the selected params

**ASAM** (``adaptive=True``), ``T = |w| + eta`` elementwise::

    v = rho * T^2 * g / (||T g|| + eps)

``eta=0`` is davda54's ``adaptive=True``; ``eta=0.01, eps=1e-16`` with ``T`` only on parameters
whose name contains ``weight`` (``adaptive_include``) is SamsungLabs' ASAM. Both restore ``w``
exactly *before* the base step (SAM's order).

The functional core :func:`sam_perturb` works on the engine's flat per-(device, dtype) tensor
lists: one fused reduction per group and kind (``ops.global_sqnorm``, summed over the ranks under
FSDP2), then one apply pass per group (``ops.asam_apply_`` / ``ops.add_scaled_``) writing the backups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from ..compiled import _eager_under_old_dynamo
from ..ops._util import acc_dtype
from ..optim import Closure, WeightPerturbation
from ..perturb import PerturbState
from ._check import check_nonneg, check_rho

__all__ = ["SAM", "sam_perturb", "SamPlan", "sam_plans"]

Include = Callable[[str, nn.Parameter], bool]


def _all_trainable(name: str, p: nn.Parameter) -> bool:
    return True


@dataclass
class SamPlan:
    """One group's parameters split into adaptive (ASAM) and plain (SAM) ones, with their
    backups and rhos (float64, on the device)."""
    ad: List[int]
    pl: List[int]
    p_ad: List[torch.Tensor]
    p_pl: List[torch.Tensor]
    b_ad: List[torch.Tensor]
    b_pl: List[torch.Tensor]
    rho_ad: torch.Tensor
    rho_pl: torch.Tensor


def sam_plans(state: PerturbState, rhos: Sequence[float], adaptive: Sequence[bool]) -> List[SamPlan]:
    """Per group of ``state``: which parameters take ASAM's ``T`` and their rhos (built eagerly, before
    a compiled step traces :func:`sam_perturb`: built inside it, the guards would see the plans appear
    and recompile at the next step)."""
    plans = []
    for g in state.groups:
        ad = [k for k, i in enumerate(g.index) if adaptive[i]]
        pl = [k for k, i in enumerate(g.index) if not adaptive[i]]
        state.ensure_buffers(g)

        def rho_t(ks):
            return torch.tensor([rhos[g.index[k]] for k in ks], dtype=torch.float64, device=g.device)
        plans.append(SamPlan(ad, pl, [g.params[k] for k in ad], [g.params[k] for k in pl],
                             [g.backups[k] for k in ad], [g.backups[k] for k in pl], rho_t(ad), rho_t(pl)))
    return plans


def sam_perturb(state: PerturbState, plans: List[SamPlan], dirs, eta: float, eps: float) -> torch.Tensor:
    """SAM / ASAM in one pass over the groups: ``n = ||T g||`` over every selected parameter (one
    fused reduction per group and kind; summed over the ranks under FSDP2), then
    ``w <- w + rho_l * T^2 * g / (n + eps)`` with ``T = |w| + eta`` on adaptive parameters and
    ``T = 1`` elsewhere, the backups written in the same pass. Returns ``n`` (0-dim, float64)
    without a host sync."""
    state.begin()
    work, parts = [], []
    for g, plan in zip(state.groups, plans):
        be = state.backend_of(g)
        ds = state.group_dirs(dirs, g)
        d_ad, d_pl = [ds[k] for k in plan.ad], [ds[k] for k in plan.pl]
        work.append((g, plan, be, d_ad, d_pl))
        if d_ad:
            parts.append(be.global_sqnorm(d_ad, plan.p_ad, eta))
        if d_pl:
            parts.append(be.global_sqnorm(d_pl, None, 0.0))
    dev0 = state.groups[0].device
    sq = parts[0].to(device=dev0, dtype=torch.float64).reshape(1)
    for part in parts[1:]:
        sq = sq + part.to(device=dev0, dtype=torch.float64)
    if state.reduce is not None:
        sq = state.reduce(sq)
    norm = sq.sqrt().reshape(())
    done = []
    try:
        for g, plan, be, d_ad, d_pl in work:
            inv = 1.0 / (norm.to(g.device) + eps)
            acc = acc_dtype(g.dtype)
            if d_ad:
                be.asam_apply_(plan.p_ad, d_ad, (plan.rho_ad * inv).to(acc), eta, plan.b_ad)
            if d_pl:
                be.add_scaled_(plan.p_pl, d_pl, (plan.rho_pl * inv).to(acc), None, None,
                                            plan.b_pl, None)
            done.append(g)
    except BaseException:
        state.restore_groups(done)
        raise
    state.active = True
    return norm


class SAM(WeightPerturbation):
    """Sharpness-Aware Minimization (and adaptive SAM / ASAM) around a base optimizer.

    Per step, either the awpfast protocol::

        sam.perturb(lambda: loss_fn(model(x), y))   # ascent gradient (BN stats frozen), w <- w + v
        sam.zero_grad(); loss_fn(model(x), y).backward()   # gradient at w + v
        sam.step()                                  # restore w exactly, then the base step

    or davda54's ``first_step`` / ``second_step`` on the gradient already in ``.grad``::

        loss_fn(model(x), y).backward(); sam.first_step(zero_grad=True)
        loss_fn(model(x), y).backward(); sam.second_step(zero_grad=True)

    or davda54's ``step(closure)`` (the closure does forward + backward and returns the loss).

    Args:
        optimizer: the base ``torch.optim`` optimizer (``param_groups`` and ``state`` are shared).
        model: the module (plain, ``DistributedDataParallel`` or FSDP2 ``fully_shard``-ed).
        rho: neighbourhood size (at most 100); the default of each param group's ``sam_rho`` (set it
            per group, as davda54's per-group ``rho``; 0 everywhere switches SAM off: no ascent pass).
        adaptive: ASAM's scale-invariant neighbourhood ``T = |w| + eta``.
        eta: ASAM's ``eta`` (0 reproduces davda54's adaptive SAM; SamsungLabs' ASAM uses 0.01).
        adaptive_include: ``(name, param) -> bool``, the parameters ``T`` applies to when
            ``adaptive`` (default: all selected; SamsungLabs' ASAM: ``lambda n, p: "weight" in n``;
            the others use ``T = 1``, in the same global norm).
        eps: added to the global norm (davda54: 1e-12; SamsungLabs' ASAM: 1e-16).
        include: ``(name, param) -> bool`` choosing the perturbed parameters (default: every
            trainable parameter the optimizer holds).
        backend, nonfinite, ascent_sync: as for :class:`awpfast.AWP` (a non-finite global norm
            skips the step's perturbation, restoring ``w`` exactly).

    ``last_direction_norms`` holds the global norm ``||T g||`` (0-dim) of the last perturbation.
    """

    rule_name = "SAM"
    grad_source = True
    off_hint = "rho 0"
    _uncompared = ("default_rho",)  # the param groups carry the rhos

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, rho: float = 0.05, *,
                 adaptive: bool = False, eta: float = 0.0, adaptive_include: Optional[Include] = None,
                 eps: float = 1e-12, include: Optional[Include] = None, backend: Optional[str] = None,
                 nonfinite: str = "skip", ascent_sync: str = "global"):
        check_rho(rho, "rho")
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be True or False, got {type(adaptive).__name__}")
        self.eta = check_nonneg(eta, "eta")
        self.eps = check_nonneg(eps, "eps")
        if self.eps == 0.0:
            raise ValueError("eps must be > 0 (it keeps rho / (||g|| + eps) finite for a zero gradient); "
                             "davda54's SAM uses 1e-12")
        if adaptive_include is not None and not callable(adaptive_include):
            raise TypeError("adaptive_include must be a callable (name, param) -> bool")
        self.adaptive, self.adaptive_include = adaptive, adaptive_include or _all_trainable
        self._default_rho = float(rho)
        super().__init__(optimizer, model, include=include or _all_trainable, restore="before_step",
                         backend=backend, nonfinite=nonfinite, ascent_sync=ascent_sync, store_deltas=False,
                         extra_defaults={"sam_rho": float(rho)})
        self._size_key, self._any_rho, self._plans = None, True, []
        self._update_sizes()  # now, eagerly: a compiled first step then finds them ready (no recompile)

    def __repr__(self):
        return (f"SAM(rho={[g.get('sam_rho') for g in self.param_groups]}, adaptive={self.adaptive}, "
                f"eta={self.eta}, layers={len(self._sel.params)}, "
                f"setting={self._setting.kind}/{self._setting.sync},\n  base={self.optimizer!r})")

    def set_rho(self, rho: float) -> None:
        """Set ``sam_rho`` of every param group."""
        self._set_all("sam_rho", rho, check_rho)

    # ----------------------------------------------------------------- the engine's hooks
    def _rule_active(self) -> bool:
        return self._update_sizes()

    def _rule_apply(self, dirs, first: bool) -> torch.Tensor:
        if not first:
            raise RuntimeError("SAM takes a single ascent step")
        return sam_perturb(self._sel, self._plans, dirs, self.eta, self.eps)

    def _rule_config(self) -> dict:
        return {"adaptive": self.adaptive, "eta": self.eta, "eps": self.eps, "default_rho": self._default_rho}

    def _rule_load(self, meta: Optional[dict]) -> None:
        self._size_key = None

    def _update_sizes(self) -> bool:
        """Push per-parameter rho and the adaptive flags to the groups' plans when a group's
        ``sam_rho``, the groups, the selection or its layout changed (one tuple comparison per step)."""
        key = self._group_values_key("sam_rho")
        if key == self._size_key:
            return self._any_rho
        rhos = self._per_parameter("sam_rho", self._default_rho, check_rho, "sam_rho in a param group")
        adaptive = []
        for n, p in zip(self._sel.names, self._sel.params):
            adaptive.append(self.adaptive and bool(self.adaptive_include(n, p)))
        self._plans = sam_plans(self._sel, rhos, adaptive)
        self._size_key, self._any_rho = key, any(rhos)
        return self._any_rho

    # ----------------------------------------------------------------- davda54's interface
    def first_step(self, zero_grad: bool = False) -> bool:
        """davda54's ``first_step``: perturb from the gradient already in ``.grad``
        (``perturb()`` without a closure); ``zero_grad=True`` then clears the gradients."""
        ok = self.perturb()
        if zero_grad:
            self.zero_grad()
        return ok

    def second_step(self, zero_grad: bool = False) -> None:
        """davda54's ``second_step``: restore ``w`` exactly, then the base optimizer's step."""
        self.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Closure] = None):
        """After ``perturb()``/``first_step()``: restore ``w`` exactly, then the base step.

        ``step(closure)`` without a prior ``perturb()`` is davda54's SAM step: the closure does
        a full forward + backward and returns the loss. The ascent direction is the gradient
        already in ``.grad`` (the closure is run once first if no selected parameter has one),
        then ``w <- w + v``, the gradients are zeroed, ``closure()`` runs at ``w + v``, ``w`` is
        restored and the base optimizer steps. Returns the loss at ``w + v``."""
        if closure is None or self._perturb_called or self._sel.active:
            return super().step(closure)
        closure = torch.enable_grad()(closure)
        self._sync_selection()
        if all(p.grad is None for p in self._sel.params):
            closure()
        self.perturb()
        try:
            self.zero_grad()
            loss = closure()
        except BaseException:
            self.restore()
            self._perturb_called = False
            raise
        super().step()
        return loss


_eager_under_old_dynamo(SAM)
