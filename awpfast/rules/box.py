"""Box AWP (the AWP variant of competition NLP fine-tuning): the wrapper and its math.

Per selected tensor, ``w0`` the weights before the first step::

    w <- clamp(w + adv_lr * (||w|| + 1e-6) / (||g|| + 1e-6) * g,  w0 - adv_eps*|w0|,  w0 + adv_eps*|w0|)

with the clean gradient already in ``.grad`` as ``g`` (no extra pass); tensors whose ``||g||`` is
0 or not finite are left alone; ``w0`` restored exactly before the base step.

The functional core :func:`box_perturb` is one fused op per (device, dtype) group
(``ops.box_perturb_``: the norms, the origin copy, the scaled step and the clamp); under FSDP2 the
per-layer norms come from one all-reduce of the shards' partial sums and are handed to the op.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..compiled import _eager_under_old_dynamo
from ..optim import Closure, WeightPerturbation
from ..perturb import PerturbState, join_norms
from ._check import check_nonneg

__all__ = ["BoxAWP", "box_perturb"]

Include = Callable[[str, nn.Parameter], bool]


def _weights(name: str, p: nn.Parameter) -> bool:
    return "weight" in name


def box_perturb(state: PerturbState, dirs, adv_lr: float, adv_eps: float, first: bool, eps: float) -> torch.Tensor:
    """Box AWP's clamped step per layer (``ops.box_perturb_``): ``first`` writes the backups (the
    box's centre ``w0``); later steps move the perturbed weights inside the same box. Under FSDP2
    the per-layer norms are all-reduced from the shards' partial sums first. Returns all direction
    norms (one vector)."""
    if first:
        state.begin()
    sharded = state.reduce is not None
    if sharded:
        ds_all = [state.group_dirs(dirs, g) for g in state.groups]
        wn, dn = state.global_norms([[g.params for g in state.groups], ds_all])
    norms, done = [], []
    try:
        for gi, g in enumerate(state.groups):
            if first:
                state.ensure_buffers(g)
            n = len(g.params)
            given = (dn[gi], wn[gi]) if sharded else None
            ds = ds_all[gi] if sharded else state.group_dirs(dirs, g)
            norms.append(state.backend_of(g).box_perturb_(
                g.params, ds, [adv_lr] * n, [adv_eps] * n, g.backups, first, eps, given))
            done.append(g)
    except BaseException:
        state.undo(done, first)
        raise
    state.active = True
    return join_norms(norms)


class BoxAWP(WeightPerturbation):
    """Box AWP (the AWP variant of competition NLP fine-tuning) around a base optimizer.

    Per step, after the usual backward (the clean gradient is in ``.grad``)::

        loss = model(**batch).loss; loss.backward()
        if awp.perturb():                 # w <- box step from .grad; False while switched off
            optimizer.zero_grad()         # (as the notebooks do: the step uses the adversarial gradient)
            model(**batch).loss.backward()
        awp.step()                        # restore w0 exactly, then the base step

    Per selected tensor (``w0``: the weights when ``perturb()`` was called)::

        w <- clamp(w + adv_lr * (||w|| + eps) / (||g|| + eps) * g,  w0 - adv_eps*|w0|,  w0 + adv_eps*|w0|)

    A tensor whose ``||g||`` is 0 or not finite (an fp16 overflow, say) is left unchanged.

    Args:
        optimizer: the base optimizer (``param_groups`` and ``state`` shared).
        model: the module (plain, DDP or FSDP2; the backup/restore never rebinds ``p.data``).
        adv_lr: step size relative to ``||w||`` (0 switches Box AWP off: no pass).
        adv_eps: half-width of the box, relative to ``|w0|`` elementwise.
        steps: ascent steps. Step 1 uses ``closure``'s gradient if one is given, else ``.grad``;
            steps 2..K use the gradient at the current perturbed weights, of ``later`` (default:
            ``closure``), taken with BatchNorm statistics frozen and ``.grad`` untouched; with
            ``steps > 1`` one of them is required. The notebooks' ``adv_step=K`` (first step on the
            clean gradient, later steps on the loss at the perturbed weights) is
            ``perturb(later=lambda: model(**batch).loss)``.
        start: Box AWP stays off for the first ``start`` calls of ``step()`` (the notebooks'
            ``start_epoch`` is ``start = start_epoch * steps_per_epoch``). ``enable()`` /
            ``disable()`` switch it on or off regardless (e.g. once a validation metric passes
            a threshold); ``enabled`` tells the current state.
        include: ``(name, param) -> bool`` (default: ``"weight" in name``, 1-D LayerNorm weights
            included, as the notebooks' ``adv_param="weight"``); only trainable parameters the
            optimizer holds.
        eps: the notebooks' ``1e-6``.
        backend, ascent_sync: as for :class:`awpfast.AWP`.

    ``last_direction_norms`` holds ``||g||`` per selected tensor (non-finite ones included).
    """

    rule_name = "BoxAWP"
    grad_source = True
    off_hint = "adv_lr 0 or disable()"
    _uncompared = ("steps_taken", "forced")  # progress, not settings

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, adv_lr: float = 1.0,
                 adv_eps: float = 0.2, *, steps: int = 1, start: int = 0, include: Optional[Include] = None,
                 backend: Optional[str] = None, eps: float = 1e-6, ascent_sync: str = "global"):
        self.adv_lr = check_nonneg(adv_lr, "adv_lr")
        self.adv_eps = check_nonneg(adv_eps, "adv_eps")
        self.eps = check_nonneg(eps, "eps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an integer >= 0 (the number of step() calls before Box AWP "
                             f"switches on), got {start!r}")
        self.steps, self.start = steps, start
        self.passes = steps
        self.steps_taken = 0
        self._forced: Optional[bool] = None
        super().__init__(optimizer, model, include=include or _weights, restore="before_step", backend=backend,
                         nonfinite="skip", ascent_sync=ascent_sync, store_deltas=False)
        self.register_step_post_hook(_count_step)

    def __repr__(self):
        return (f"BoxAWP(adv_lr={self.adv_lr}, adv_eps={self.adv_eps}, steps={self.steps}, start={self.start}, "
                f"enabled={self.enabled}, layers={len(self._sel.params)}, "
                f"setting={self._setting.kind}/{self._setting.sync},\n  base={self.optimizer!r})")

    # ----------------------------------------------------------------- gating
    @property
    def enabled(self) -> bool:
        """Whether the next ``perturb()`` perturbs (``enable()``/``disable()``, else ``start``)."""
        if self._forced is not None:
            return self._forced
        return self.steps_taken >= self.start

    def enable(self) -> None:
        """Switch Box AWP on from now on (overrides ``start``)."""
        self._forced = True

    def disable(self) -> None:
        """Switch Box AWP off (``perturb()`` returns False without a pass) until ``enable()``."""
        self._forced = False

    # ----------------------------------------------------------------- rule
    def perturb(self, closure: Union[Closure, Sequence[Closure], None] = None, *,
                later: Union[Closure, Sequence[Closure], None] = None) -> bool:
        """Box-perturb the selected weights. ``closure``: the first step's loss (default: the
        gradient already in ``.grad``); ``later``: the loss re-evaluated at the perturbed
        weights for steps 2..K (default: ``closure``). Returns False (no pass, weights untouched)
        while switched off (``start``, ``disable()``, ``adv_lr == 0`` or ``adv_eps == 0``)."""
        return self._perturb(closure, later)

    later_hint = ("BoxAWP with steps={passes} needs the loss at the perturbed weights for steps 2..{passes}: "
                  "pass it as perturb(later=lambda: model(**batch).loss) (step 1 then uses .grad), or "
                  "perturb(closure) for every step")

    # ----------------------------------------------------------------- the engine's hooks
    def _rule_active(self) -> bool:
        check_nonneg(self.adv_lr, "adv_lr")
        check_nonneg(self.adv_eps, "adv_eps")
        return self.enabled and self.adv_lr > 0 and self.adv_eps > 0

    def _rule_apply(self, dirs, first: bool) -> torch.Tensor:
        return box_perturb(self._sel, dirs, self.adv_lr, self.adv_eps, first, self.eps)

    def _rule_check(self, dnorms):
        return None  # non-finite tensors are skipped one by one inside the op, no host sync

    def _rule_config(self) -> dict:
        return {"adv_lr": self.adv_lr, "adv_eps": self.adv_eps, "steps": self.steps, "start": self.start,
                "eps": self.eps, "steps_taken": self.steps_taken, "forced": self._forced}

    def _rule_load(self, meta: Optional[dict]) -> None:
        if meta is None:
            return
        self.steps_taken = int(meta.get("steps_taken", 0))
        forced = meta.get("forced")
        self._forced = None if forced is None else bool(forced)


def _count_step(opt: BoxAWP, args, kwargs) -> None:
    """``start`` counts the wrapper's steps (a step post-hook)."""
    opt.steps_taken += 1


_eager_under_old_dynamo(BoxAWP)
