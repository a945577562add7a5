"""The weight-perturbation rules, side by side on one engine: AWP, SAM / ASAM and Box AWP.

Each rule subclasses :class:`awpfast.optim.WeightPerturbation` (shared ``param_groups``/``state``
with the base optimizer, exact restore from a backup, BatchNorm statistics frozen in the ascent
pass, DDP / FSDP2, ``state_dict``, step hooks) and only says how big the perturbation is; it
applies it through one fused multi-tensor op behind the seam (:mod:`awpfast.ops`). Same
protocol for all: ``perturb(closure)`` -> the user's backward at ``w + v`` -> ``step()``.

**AWP** (Wu et al. 2020), per selected layer (Frobenius norms of whole tensors), ``g`` the
gradient of the closure's loss::

    v_l = gamma * ||w_l|| * g_l / (||g_l|| + 1e-20)

No proxy model: the ascent gradient is taken on the model itself with BatchNorm running
statistics frozen.

**SAM** (Foret et al. 2021)::

    v = rho * g / (||g|| + 1e-12)                       one global norm over the selected params

**Adaptive SAM / ASAM** (Kwon et al. 2021), ``adaptive=True``, ``T = |w| + eta`` elementwise::

    v = rho * T^2 * g / (||T g|| + eps)

``eta=0`` is davda54's ``adaptive=True``; ``eta=0.01, eps=1e-16`` with ``T`` only on parameters
whose name contains ``weight`` (``adaptive_include``) is SamsungLabs' ASAM. Both restore ``w``
exactly *before* the base step (SAM's order).

**Box AWP** (competition NLP fine-tuning), per selected tensor, ``w0`` the weights before
the first step::

    w <- clamp(w + adv_lr * (||w|| + 1e-6) / (||g|| + 1e-6) * g,  w0 - adv_eps*|w0|,  w0 + adv_eps*|w0|)

with the clean gradient already in ``.grad`` as ``g`` (no extra pass); tensors whose ``||g||`` is
0 or not finite are left alone; ``w0`` restored exactly before the base step.

This module imports the engine from :mod:`awpfast.optim`, never the reverse; the old paths
``awpfast.optim.AWP`` and ``awpfast.family.SAM`` / ``BoxAWP`` re-export these classes.
"""
from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .compiled import _eager_under_old_dynamo
from .optim import Closure, WeightPerturbation

__all__ = ["AWP", "SAM", "BoxAWP"]

Include = Callable[[str, nn.Parameter], bool]


def _all_trainable(name: str, p: nn.Parameter) -> bool:
    return True


def _weights(name: str, p: nn.Parameter) -> bool:
    return "weight" in name


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_nonneg(value, what: str) -> float:
    if not (_is_number(value) and 0 <= float(value) < float("inf")):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}"
                         + (" (a string: pass a float)" if isinstance(value, str) else ""))
    return float(value)


RHO_MAX = 100.0  # SAM's rho bound: a neighbourhood larger than this (in weight norm) is not a local one


def _check_rho(rho, what: str) -> float:
    value = _check_nonneg(rho, what)
    if value > RHO_MAX:
        raise ValueError(f"{what} must be <= {RHO_MAX:g} (SAM moves the weights by rho in norm: usual values are "
                         f"0.01-2, ASAM's up to 5), got {rho!r}")
    return value


def _check_gamma(gamma, what):
    ok = _is_number(gamma) and 0 <= float(gamma) <= 1
    if not ok:
        raise ValueError(f"{what} must be a finite number >= 0 and <= 1 (each layer's perturbation relative to its "
                         f"weights: 0 disables AWP, the paper uses 0.005-0.01; above 1 it swamps the weights), got "
                         f"{gamma!r}" + (" (a string: pass a float, e.g. 0.01)" if isinstance(gamma, str) else ""))



class AWP(WeightPerturbation):
    """Adversarial Weight Perturbation around a base optimizer.

    Args:
        optimizer: the base ``torch.optim`` optimizer (its ``param_groups`` and ``state`` are shared).
        model: the module whose weights are perturbed: a plain module, a ``DistributedDataParallel``
            wrapper, or a module whose blocks were ``fully_shard``-ed (FSDP2); detected automatically.
        gamma: relative perturbation size ``||v_l|| / ||w_l||``; the default of each param group's
            ``awp_gamma`` (change it there for a schedule or warm-up; 0 skips the ascent pass).
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

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, gamma: float = 0.01, *,
                 steps: int = 1, step_size: Optional[float] = None,
                 include: Optional[Callable[[str, nn.Parameter], bool]] = None,
                 restore: Optional[str] = None, backend: Optional[str] = None,
                 nonfinite: str = "skip", ascent_sync: str = "global", eps: float = 1e-20,
                 ascent_every: int = 1, ascent_fraction: float = 1.0, ascent_seed: Optional[int] = None,
                 ascent: str = "gradient"):
        _check_gamma(gamma, "gamma")
        if type(ascent_every) is int and ascent_every > 1 and steps != 1:
            raise ValueError(f"ascent_every={ascent_every} re-uses a one-step direction: use steps=1 (got steps={steps})")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}; use steps=1 for the reference AWP")
        if step_size is not None and not (_is_number(step_size) and 0 < step_size <= 1):
            raise ValueError(f"step_size must be a number > 0 and <= 1 (relative to each layer's weights, like gamma; "
                             f"or None for the default), got {step_size!r}")
        if not (_is_number(eps) and 0 <= eps < float("inf")):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.steps, self.step_size, self.eps = steps, step_size, float(eps)
        self._default_gamma = float(gamma)
        super().__init__(optimizer, model, include=include, restore=restore, backend=backend,
                         nonfinite=nonfinite, ascent_sync=ascent_sync, extra_defaults={"awp_gamma": float(gamma)},
                         ascent_every=ascent_every, ascent_fraction=ascent_fraction, ascent_seed=ascent_seed,
                         ascent=ascent)
        for g in optimizer.param_groups:
            g.setdefault("awp_gamma", float(gamma))
        self._size_key, self._any_gamma = None, True
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

    def _on_new_group(self, group: dict) -> None:
        group.setdefault("awp_gamma", self._default_gamma)

    def _after_load(self) -> None:
        self._size_key = None

    def set_gamma(self, gamma: float) -> None:
        """Set ``awp_gamma`` of every param group (e.g. for a warm-up)."""
        _check_gamma(gamma, "gamma")
        for g in self.param_groups:
            g["awp_gamma"] = float(gamma)

    def _rule_config(self) -> dict:
        return {"steps": self.steps, "step_size": self.step_size, "default_gamma": self._default_gamma}

    def _check_meta(self, meta: dict) -> None:
        meta = {k: v for k, v in meta.items() if k != "default_gamma"}  # param groups carry the gammas
        super()._check_meta(meta)

    # ----------------------------------------------------------------- per-layer gamma
    def _update_sizes(self) -> bool:
        """Push the per-layer gamma and step size to the perturb state when a param group's
        ``awp_gamma``, the groups themselves or the selection changed; returns whether any gamma
        is > 0. The steady state is one small tuple comparison per step, no loop over layers."""
        # plain loops: under torch.compile this runs eagerly after the ascent's graph break, where
        # Dynamo cannot start a frame on a comprehension (see WeightPerturbation._param_group_key)
        groups = self.param_groups
        key = []
        for g in groups:
            key.append((id(g), g.get("awp_gamma")))
        key = (tuple(key), self._sel.generation)
        if key == self._size_key:
            return self._any_gamma
        per_param = {}
        for g in groups:
            val = g.get("awp_gamma", self._default_gamma)
            _check_gamma(val, "awp_gamma in a param group")
            for p in g["params"]:
                per_param[id(p)] = float(val)
        k = self.steps
        gammas, etas = [], []
        for p in self._sel.params:
            g = per_param.get(id(p), self._default_gamma)
            gammas.append(g)
            etas.append(self.step_size if self.step_size is not None else (g if k == 1 else 2.5 * g / k))
        self._sel.set_sizes(gammas, etas)
        self._size_key, self._any_gamma = key, any(gammas)
        return self._any_gamma

    def _rule_active(self) -> bool:
        return self._update_sizes()

    def _rule_passes(self) -> int:
        return self.steps

    def _rule_first(self, dirs):
        return self._sel.perturb(dirs, self.eps)

    def _rule_next(self, dirs):
        return self._sel.ascent_step(dirs, self.eps)


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
        rho: neighbourhood size; the default of each param group's ``sam_rho`` (set it per group,
            as davda54's per-group ``rho``; 0 everywhere switches SAM off: no ascent pass).
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
    _grad_source = True
    _off_hint = "rho 0"

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, rho: float = 0.05, *,
                 adaptive: bool = False, eta: float = 0.0, adaptive_include: Optional[Include] = None,
                 eps: float = 1e-12, include: Optional[Include] = None, backend: Optional[str] = None,
                 nonfinite: str = "skip", ascent_sync: str = "global"):
        _check_rho(rho, "rho")
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be True or False, got {type(adaptive).__name__}")
        self.eta = _check_nonneg(eta, "eta")
        self.eps = _check_nonneg(eps, "eps")
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
        for g in optimizer.param_groups:
            g.setdefault("sam_rho", float(rho))
        self._size_key, self._any_rho = None, True
        self._update_sizes()  # now, eagerly: a compiled first step then finds them ready (no recompile)

    def __repr__(self):
        return (f"SAM(rho={[g.get('sam_rho') for g in self.param_groups]}, adaptive={self.adaptive}, "
                f"eta={self.eta}, layers={len(self._sel.params)}, "
                f"setting={self._setting.kind}/{self._setting.sync},\n  base={self.optimizer!r})")

    def _on_new_group(self, group: dict) -> None:
        group.setdefault("sam_rho", self._default_rho)

    def _after_load(self) -> None:
        self._size_key = None

    def set_rho(self, rho: float) -> None:
        """Set ``sam_rho`` of every param group."""
        _check_rho(rho, "rho")
        for g in self.param_groups:
            g["sam_rho"] = float(rho)

    def _rule_config(self) -> dict:
        return {"adaptive": self.adaptive, "eta": self.eta, "eps": self.eps, "default_rho": self._default_rho}

    def _check_meta(self, meta: dict) -> None:
        super()._check_meta({k: v for k, v in meta.items() if k != "default_rho"})  # groups carry the rhos

    def _update_sizes(self) -> bool:
        """Push per-parameter rho and the adaptive flags to the perturb state when a group's
        ``sam_rho``, the groups or the selection changed (one tuple comparison per step)."""
        groups = self.param_groups  # plain loops: see AWP._update_sizes
        key = []
        for g in groups:
            key.append((id(g), g.get("sam_rho")))
        key = (tuple(key), self._sel.generation)
        if key == self._size_key:
            return self._any_rho
        where = {}
        for g in groups:
            for p in g["params"]:
                where[id(p)] = g
        rhos, adaptive = [], []
        for n, p in zip(self._sel.names, self._sel.params):
            g = where.get(id(p))
            val = self._default_rho if g is None else g.get("sam_rho", self._default_rho)
            rhos.append(_check_rho(val, "sam_rho in a param group"))
            adaptive.append(self.adaptive and bool(self.adaptive_include(n, p)))
        self._sel.set_sam(rhos, adaptive)
        self._size_key, self._any_rho = key, any(rhos)
        return self._any_rho

    def _rule_active(self) -> bool:
        return self._update_sizes()

    def _rule_first(self, dirs):
        return self._sel.sam_perturb(dirs, self.eta, self.eps)

    def _rule_next(self, dirs):  # one ascent pass only
        raise RuntimeError("SAM takes a single ascent step")

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
    _grad_source = True
    _off_hint = "adv_lr 0 or disable()"

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, adv_lr: float = 1.0,
                 adv_eps: float = 0.2, *, steps: int = 1, start: int = 0, include: Optional[Include] = None,
                 backend: Optional[str] = None, eps: float = 1e-6, ascent_sync: str = "global"):
        self.adv_lr = _check_nonneg(adv_lr, "adv_lr")
        self.adv_eps = _check_nonneg(adv_eps, "adv_eps")
        self.eps = _check_nonneg(eps, "eps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an integer >= 0 (the number of step() calls before Box AWP "
                             f"switches on), got {start!r}")
        self.steps, self.start = steps, start
        self.steps_taken = 0
        self._forced: Optional[bool] = None
        super().__init__(optimizer, model, include=include or _weights, restore="before_step", backend=backend,
                         nonfinite="skip", ascent_sync=ascent_sync, store_deltas=False)

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

    def _step(self, closure=None):
        out = super()._step(closure)
        self.steps_taken += 1
        return out

    # ----------------------------------------------------------------- rule
    def perturb(self, closure: Union[Closure, Sequence[Closure], None] = None, *,
                later: Union[Closure, Sequence[Closure], None] = None) -> bool:
        """Box-perturb the selected weights. ``closure``: the first step's loss (default: the
        gradient already in ``.grad``); ``later``: the loss re-evaluated at the perturbed
        weights for steps 2..K (default: ``closure``). Returns False (no pass, weights untouched)
        while switched off (``start``, ``disable()``, ``adv_lr == 0`` or ``adv_eps == 0``)."""
        return self._perturb(closure, later)

    def _rule_active(self) -> bool:
        _check_nonneg(self.adv_lr, "adv_lr")
        _check_nonneg(self.adv_eps, "adv_eps")
        return self.enabled and self.adv_lr > 0 and self.adv_eps > 0

    def _rule_passes(self) -> int:
        return self.steps

    def _later_closures_msg(self, passes: int) -> str:
        return (f"BoxAWP with steps={passes} needs the loss at the perturbed weights for steps 2..{passes}: "
                "pass it as perturb(later=lambda: model(**batch).loss) (step 1 then uses .grad), or "
                "perturb(closure) for every step")

    def _rule_first(self, dirs):
        return self._sel.box_perturb(dirs, self.adv_lr, self.adv_eps, True, self.eps)

    def _rule_next(self, dirs):
        return self._sel.box_perturb(dirs, self.adv_lr, self.adv_eps, False, self.eps)

    def _rule_check(self, dnorms):
        return None  # non-finite tensors are skipped one by one inside the op, no host sync

    def _rule_config(self) -> dict:
        return {"adv_lr": self.adv_lr, "adv_eps": self.adv_eps, "steps": self.steps, "start": self.start,
                "eps": self.eps}

    def _meta(self) -> dict:
        return dict(super()._meta(), steps_taken=self.steps_taken, forced=self._forced)

    def _load_rule_meta(self, meta: dict) -> None:
        self.steps_taken = int(meta.get("steps_taken", 0))
        forced = meta.get("forced")
        self._forced = None if forced is None else bool(forced)


_eager_under_old_dynamo(AWP)
_eager_under_old_dynamo(SAM)
_eager_under_old_dynamo(BoxAWP)
