"""RWP, Robust Weight Perturbation (Yu et al., IJCAI 2022): the wrapper and its math.

AWP's weight-space adversary constrained by the Loss Stationary Condition: only the adversarial
examples whose loss is below a threshold ``c`` drive the weight perturbation. Per step, ``K``
ascent passes starting from ``v = 0`` (design brief section 14; the authors' code
``AT_AWP_RWP/utils_rwp.py``)::

    l_i   = per-example loss at w + v        (train mode, BatchNorm statistics untouched)
    m_i   = [l_i < c]                        (the LSC; c = 1.7)
    d    <- d + lr * grad_w mean_i(m_i * l_i) (the mean over the whole batch: masked examples count as 0)
    v     = gamma * ||w||_all * d / (||d||_all + 1e-20)

with ONE norm over all selected weights together (not per layer as AWP), over the ranks too under
DDP (the gradient is the global batch's) and FSDP2 (the norms are sums of the shards' partial
sums). With no example below ``c`` the direction is zero and so is ``v``.

The closure returns the **per-example** losses (``reduction="none"``); the rule applies the mask
and the mean. The functional core :func:`rwp_apply` works on the engine's flat per-(device, dtype)
tensor lists: the accumulated direction ``d`` lives in one buffer the size of the selected weights,
the two global norms are two fused reductions (``ops.global_sqnorm``), and the weights are written
by ``ops.add_scaled_`` from the backups (one pass, no host sync).
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from .. import ops as _ops
from ..compiled import _eager_under_old_dynamo
from ..ops._util import acc_dtype
from ..optim import Closure, WeightPerturbation
from ..perturb import PerturbState
from ._check import check_gamma, check_nonneg, is_number

__all__ = ["RWP", "rwp_apply", "lsc_loss"]

EPS = 1e-20  # the reference's


def lsc_loss(losses: torch.Tensor, threshold: float):
    """``(mean_i(m_i * l_i), number kept)``, ``m_i = [l_i < threshold]`` (the Loss Stationary Condition)."""
    keep = (losses.detach() < threshold).to(losses.dtype)
    return (losses * keep).mean(), keep.sum()


def _sqnorm(state: PerturbState, lists) -> torch.Tensor:
    """Sum over every group of ``sum ||t||^2`` of the group's list in ``lists`` (float64, 1 element,
    on the first group's device), summed over the ranks under FSDP2. No host sync."""
    dev0 = state.groups[0].device
    sq = None
    for g, ts in zip(state.groups, lists):
        part = state.backend_of(g).global_sqnorm(list(ts), None, 0.0).to(device=dev0,
                                                                                          dtype=torch.float64)
        sq = part.reshape(1) if sq is None else sq + part
    if state.reduce is not None:
        sq = state.reduce(sq)
    return sq


def rwp_apply(state: PerturbState, acc: List[List[torch.Tensor]], gammas: List[torch.Tensor], dirs,
              lr: float, first: bool, wnorm: Optional[torch.Tensor] = None):
    """One RWP ascent pass: ``acc <- (0 if first) + lr * dirs`` per layer, then the weights at
    ``w + gamma_l * ||w||_all / (||acc||_all + 1e-20) * acc`` (``first`` writes the backups ``w``;
    later passes start from them). ``acc[gi]``: the accumulated direction of group gi (flat, like the
    parameters); ``gammas[gi]``: its layers' gammas (float64, on the device); ``wnorm``: ``||w||_all``
    of the backups (computed on the first pass when None). Returns ``(||acc||_all, ||w||_all)``
    (0-dim, float64), no host sync."""
    if first:
        state.begin()
    for g, a in zip(state.groups, acc):
        ds = state.group_dirs(dirs, g)
        if first:
            torch._foreach_zero_(a)
        torch._foreach_add_(a, [d.to(t.dtype) for d, t in zip(ds, a)], alpha=lr)
    if wnorm is None:
        wnorm = _sqnorm(state, [g.params for g in state.groups]).sqrt().reshape(())
    dnorm = _sqnorm(state, acc).sqrt().reshape(())
    ratio = wnorm / (dnorm + EPS)
    done = []
    try:
        for g, a, gam in zip(state.groups, acc, gammas):
            scale = (gam * ratio.to(g.device)).to(acc_dtype(g.dtype))
            deltas = g.deltas if state.store_deltas else None
            if first:
                state.ensure_buffers(g)
                _ops.add_scaled_(g.params, a, scale, backups=g.backups, deltas=deltas, backend=state.backend)
            else:
                _ops.add_scaled_(g.params, a, scale, base=g.backups, deltas=deltas, backend=state.backend)
            done.append(g)
    except BaseException:
        state.undo(done, first)
        raise
    state.active = True
    return dnorm, wnorm


class RWP(WeightPerturbation):
    """Robust Weight Perturbation (Yu et al., IJCAI 2022) around a base optimizer.

    Per step (``x_adv`` from the attack)::

        rwp.perturb(lambda: F.cross_entropy(model(x_adv), y, reduction="none"))   # per-example losses
        rwp.zero_grad()
        F.cross_entropy(model(x_adv), y).backward()    # gradient at w + v
        rwp.step()                                      # base step, then remove v

    Args:
        optimizer: the base ``torch.optim`` optimizer (``param_groups`` and ``state`` shared).
        model: the module (plain, DDP or FSDP2; detected automatically).
        gamma: ``||v|| / ||w||`` over all selected weights together, in [0, 1]; the default of each
            param group's ``awp_gamma`` (0 skips the ascent: a warm-up). The reference AT script: 0.01.
        steps: ascent passes per step (the reference: 10); each re-evaluates the closure at the
            current ``w + v``.
        lr: the step size of each ascent pass (the reference's proxy SGD lr, 0.01). The global
            re-scaling makes ``v`` independent of ``lr`` after one pass; with several passes ``lr``
            weighs nothing either (``d`` is a sum of ``lr``-scaled gradients): it is kept for fidelity.
        loss_threshold: the Loss Stationary Condition's ``c`` (the reference: 1.7); examples whose
            loss is ``>= c`` do not drive the perturbation.
        include, restore, backend, nonfinite, ascent_sync: as for :class:`awpfast.AWP` (default
            selection: ``ndim > 1`` and ``"weight"`` in the name, the reference's; default restore
            order: the reference's, step at ``w + v`` then subtract ``v``).

    The closure must return per-example losses (``reduction="none"``); a scalar is refused. When
    no example of a step passes the condition, ``v`` is 0 (said once in a warning);
    ``last_kept_fraction`` holds the share of examples kept in the last ``perturb()``'s passes.
    Memory: one buffer the size of the selected weights (the accumulated direction), besides the
    backups. Cost: ``steps`` forward + backward passes per step (10 for the reference: about ten
    times AWP's extra over AT).
    """

    rule_name = "RWP"
    off_hint = "gamma 0"
    later_hint = "{name} re-evaluates the loss at w + v in each of its {passes} passes: pass the closure"
    _uncompared = ("default_gamma",)

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, gamma: float = 0.01, *,
                 steps: int = 10, lr: float = 0.01, loss_threshold: float = 1.7,
                 include: Optional[Callable[[str, nn.Parameter], bool]] = None,
                 restore: Optional[str] = None, backend: Optional[str] = None, nonfinite: str = "skip",
                 ascent_sync: str = "global"):
        check_gamma(gamma, "gamma")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1 (the reference takes 10 ascent passes), got {steps!r}")
        if not (is_number(lr) and 0 < lr < float("inf")):
            raise ValueError(f"lr must be a finite number > 0 (the reference: 0.01), got {lr!r}")
        self.loss_threshold = check_nonneg(loss_threshold, "loss_threshold")
        self.steps, self.lr, self.passes = steps, float(lr), steps
        self._default_gamma = float(gamma)
        super().__init__(optimizer, model, include=include, restore=restore, backend=backend, nonfinite=nonfinite,
                         ascent_sync=ascent_sync, extra_defaults={"awp_gamma": float(gamma)})
        self._size_key, self._any_gamma = None, True
        self._gammas: List[torch.Tensor] = []
        self._acc: List[List[torch.Tensor]] = []
        self._wnorm: Optional[torch.Tensor] = None
        self._kept: Optional[torch.Tensor] = None
        self._seen = 0
        self.last_kept_fraction: Optional[float] = None
        self._update_sizes()

    def __repr__(self):
        return (f"RWP(gamma={[g.get('awp_gamma') for g in self.param_groups]}, steps={self.steps}, lr={self.lr}, "
                f"loss_threshold={self.loss_threshold}, restore={self.restore_mode!r}, "
                f"layers={len(self._sel.params)}, setting={self._setting.kind}/{self._setting.sync},\n"
                f"  base={self.optimizer!r})")

    def set_gamma(self, gamma: float) -> None:
        """Set ``awp_gamma`` of every param group (e.g. for a warm-up)."""
        self._set_all("awp_gamma", gamma, check_gamma)

    def perturb(self, closure: Union[Closure, Sequence[Closure], None] = None) -> bool:
        """Run the ``steps`` ascent passes and perturb (``w <- w + v``). ``closure`` returns the
        per-example losses of the adversarial batch (a list of closures: micro-batches, their
        masked sums added). Returns False (weights untouched) while gamma is 0."""
        if closure is None:
            raise TypeError("RWP.perturb() needs the closure returning the per-example adversarial losses, e.g. "
                            "lambda: F.cross_entropy(model(x_adv), y, reduction='none')")
        many = isinstance(closure, (list, tuple))
        closures = list(closure) if many else [closure]
        if not closures or not all(callable(c) for c in closures):
            raise TypeError(f"perturb() needs a closure returning the per-example losses (or a list of them), got "
                            f"{type(closure).__name__}")
        self._kept, self._seen = None, 0
        masked = [self._masked(c) for c in closures]
        ok = self._perturb(masked if many else masked[0])
        if self._kept is not None and self._seen:
            kept = int(self._kept)  # one host sync per step
            self.last_kept_fraction = kept / self._seen
            if kept == 0:
                self._warn_once("lsc-empty", f"RWP: no example's loss was below loss_threshold={self.loss_threshold:g} "
                                             "in this step's ascent passes, so the perturbation is zero (the Loss "
                                             "Stationary Condition; said once)")
        return ok

    def _masked(self, closure: Closure) -> Closure:
        def loss():
            losses = closure()
            if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
                shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                raise ValueError(f"RWP's closure must return the per-example losses, a 1-D tensor (e.g. "
                                 f"F.cross_entropy(model(x_adv), y, reduction='none')), got {shape}: the Loss "
                                 "Stationary Condition keeps only the examples whose loss is below loss_threshold")
            value, kept = lsc_loss(losses, self.loss_threshold)
            self._kept = kept if self._kept is None else self._kept + kept
            self._seen += losses.numel()
            return value
        return loss

    def accumulate(self, closure: Closure) -> None:
        raise TypeError("RWP re-evaluates the loss at w + v in each of its ascent passes, so it cannot take an "
                        "accumulated direction: pass the micro-batch closures as a list, perturb([c1, c2, ...])")

    def direction_request(self, who: str):
        raise ValueError(f"{who}(awp=...) cannot source RWP's direction: RWP re-evaluates the per-example losses at "
                         "w + v in each ascent pass; build the attack without awp= and call rwp.perturb(closure)")

    # ----------------------------------------------------------------- the engine's hooks
    def _rule_active(self) -> bool:
        return self._update_sizes()

    def _rule_apply(self, dirs, first: bool) -> torch.Tensor:
        dnorm, self._wnorm = rwp_apply(self._sel, self._acc, self._gammas, dirs, self.lr, first,
                                       None if first else self._wnorm)
        return dnorm

    def _rule_config(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "loss_threshold": self.loss_threshold,
                "default_gamma": self._default_gamma}

    def _rule_load(self, meta: Optional[dict]) -> None:
        self._size_key = None

    def _update_sizes(self) -> bool:
        """Per-layer gammas on the device and the accumulator buffers, rebuilt when a group's
        ``awp_gamma``, the groups, the selection or its layout changed."""
        key = self._group_values_key("awp_gamma")
        if key == self._size_key:
            return self._any_gamma
        gammas = self._per_parameter("awp_gamma", self._default_gamma, check_gamma, "awp_gamma in a param group")
        self._gammas, self._acc = [], []
        for g in self._sel.groups:
            self._gammas.append(torch.tensor([gammas[i] for i in g.index], dtype=torch.float64, device=g.device))
            self._acc.append([torch.zeros_like(p) for p in g.params])
        self._size_key, self._any_gamma = key, any(gammas)
        return self._any_gamma


_eager_under_old_dynamo(RWP)
