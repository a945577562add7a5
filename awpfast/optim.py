"""The AWP optimizer wrapper: any ``torch.optim`` optimizer becomes an AWP optimizer.

Per training step (``x_adv`` already found by an attack)::

    awp.perturb(lambda: F.cross_entropy(model(x_adv), y))   # w <- w + v, BN stats and .grad untouched
    awp.zero_grad()
    F.cross_entropy(model(x_adv), y).backward()             # gradient at w + v
    awp.step()                                              # base step, then remove v

or, restoring on any exception (and when ``step()`` is never reached)::

    with awp.perturbed(closure):
        ...; loss.backward(); awp.step()

``v_l = gamma * ||w_l|| * g_l / (||g_l|| + 1e-20)`` per selected layer (Frobenius norms of
whole tensors), with ``g`` the gradient of the closure's loss. No proxy model: the ascent
gradient is taken on the model itself with BatchNorm running statistics frozen.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from itertools import chain
from typing import Callable, Optional

import torch
import torch.optim.optimizer as _optim_mod
from torch import nn

from .perturb import PerturbState, default_include, select_parameters

__all__ = ["AWP"]

_RESTORE_MODES = ("after_step", "before_step")


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module):
    """Inside: BatchNorm layers in train mode normalize with batch statistics as usual but
    update neither running_mean/var nor num_batches_tracked. Eval-mode layers are unaffected."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


class AWP(torch.optim.Optimizer):
    """Adversarial Weight Perturbation around a base optimizer.

    Args:
        optimizer: the base ``torch.optim`` optimizer (its ``param_groups`` and ``state`` are shared).
        model: the module whose weights are perturbed.
        gamma: relative perturbation size ``||v_l|| / ||w_l||``; the default of each param group's
            ``awp_gamma`` (change it there for a schedule or warm-up; 0 skips the ascent pass).
        steps: ascent steps; ``> 1`` is multi-step AWP with projection onto ``||v_l|| <= gamma ||w_l||``.
        step_size: ascent step size ``eta`` (relative, like gamma); default ``gamma`` for one step and
            ``2.5 * gamma / steps`` for several.
        include: ``(name, param) -> bool`` choosing the perturbed parameters; default: the reference
            rule (``ndim > 1`` and ``"weight"`` in the name).
        restore: ``"after_step"`` (reference order: step at ``w + v``, then subtract ``v``) or
            ``"before_step"`` (restore ``w`` bit-exactly from the backup, then step).
        backend: seam backend (``reference``, ``foreach``, ``triton``, ``native``); default: the
            ``AWPFAST_BACKEND`` environment variable, else the best for the device.
        nonfinite: ``"skip"`` (default: a non-finite ascent gradient skips this step's perturbation,
            with a warning, counted in ``skipped_steps``) or ``"raise"``. Eagerly the check is one
            host sync per ``perturb()``; inside ``torch.compile`` or a CUDA-graph capture the skip
            happens on the device (no sync, no graph break, no warning; still counted in
            ``skipped_steps``).
        eps: the ``1e-20`` of the reference.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, gamma: float = 0.01, *,
                 steps: int = 1, step_size: Optional[float] = None,
                 include: Optional[Callable[[str, nn.Parameter], bool]] = None,
                 restore: str = "after_step", backend: Optional[str] = None,
                 nonfinite: str = "skip", eps: float = 1e-20):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"AWP wraps a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                            "build the base optimizer first, e.g. AWP(torch.optim.SGD(model.parameters(), lr=0.1), model)")
        if isinstance(optimizer, AWP):
            raise TypeError("the optimizer is already an AWP wrapper; wrap the base optimizer only once")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        _check_gamma(gamma, "gamma")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}; use steps=1 for the reference AWP")
        if step_size is not None and not (step_size > 0 and step_size < float("inf")):
            raise ValueError(f"step_size must be a finite number > 0 (or None for the default), got {step_size!r}")
        if restore not in _RESTORE_MODES:
            raise ValueError(f"restore must be one of {_RESTORE_MODES}, got {restore!r}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if backend is not None:
            from .ops import BACKENDS
            if backend not in BACKENDS:
                raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or None")

        self.optimizer = optimizer
        self.model = model
        self.steps, self.step_size, self.restore_mode = steps, step_size, restore
        self.nonfinite, self.eps = nonfinite, float(eps)
        self.include = include or default_include
        named = select_parameters(model, self.include)
        if not named:
            raise ValueError(
                "AWP selected no parameters: the include rule matched none of the model's trainable "
                "parameters (the default takes those with ndim > 1 and 'weight' in the name). Pass "
                "include=lambda name, p: ... to choose them.")
        self._sel = PerturbState(named, store_deltas=(restore == "after_step"), backend=backend, model=model)
        self._default_gamma = float(gamma)
        for g in optimizer.param_groups:
            g.setdefault("awp_gamma", float(gamma))
        self._size_key, self._any_gamma = None, True
        self._skipped_host = 0
        self.perturb_count = 0
        self.last_direction_norms: Optional[torch.Tensor] = None
        # torch.optim.Optimizer bookkeeping without re-adding the base's parameters
        self.defaults = dict(optimizer.defaults, awp_gamma=float(gamma))
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"

    # ----------------------------------------------------------------- shared state
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):  # torch internals may assign; keep the base authoritative
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def perturbed_parameters(self):
        """Names of the parameters AWP perturbs."""
        return list(self._sel.names)

    @property
    def is_perturbed(self) -> bool:
        return self._sel.active

    def __repr__(self):
        return (f"AWP(gamma={[g.get('awp_gamma') for g in self.param_groups]}, steps={self.steps}, "
                f"restore={self.restore_mode!r}, layers={len(self._sel.params)},\n  base={self.optimizer!r})")

    def add_param_group(self, param_group):
        self.optimizer.add_param_group(param_group)
        self.optimizer.param_groups[-1].setdefault("awp_gamma", self._default_gamma)

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def set_gamma(self, gamma: float) -> None:
        """Set ``awp_gamma`` of every param group (e.g. for a warm-up)."""
        _check_gamma(gamma, "gamma")
        for g in self.param_groups:
            g["awp_gamma"] = float(gamma)

    # ----------------------------------------------------------------- per-layer gamma
    def _update_sizes(self) -> bool:
        """Push the per-layer gamma and step size to the perturb state when a param group's
        ``awp_gamma`` (or the groups themselves) changed; returns whether any gamma is > 0.
        The steady state is one small tuple comparison per step, no loop over layers."""
        groups = self.param_groups
        key = tuple((id(g), g.get("awp_gamma")) for g in groups)
        if key == self._size_key:
            return self._any_gamma
        where = {id(p): g for g in groups for p in g["params"]}
        per_group = {}
        for g in groups:
            val = g.get("awp_gamma", self._default_gamma)
            _check_gamma(val, "awp_gamma in a param group")
            per_group[id(g)] = float(val)
        gammas = [per_group[id(where[id(p)])] if id(p) in where else self._default_gamma for p in self._sel.params]
        k = self.steps
        etas = [self.step_size if self.step_size is not None else (g if k == 1 else 2.5 * g / k) for g in gammas]
        self._sel.set_sizes(gammas, etas)
        self._size_key, self._any_gamma = key, any(gammas)
        return self._any_gamma

    # ----------------------------------------------------------------- perturb
    def _ascent_grads(self, closure):
        if not callable(closure):
            raise TypeError(f"perturb() needs a closure returning the ascent loss, got {type(closure).__name__}")
        with torch.enable_grad(), frozen_batchnorm_stats(self.model):
            loss = closure()
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
        grads = torch.autograd.grad(loss.reshape(()), self._sel.params, allow_unused=True)
        if all(g is None for g in grads):
            raise ValueError(
                "the AWP closure's loss is not connected to any selected parameter: compute the loss "
                "with the model passed to AWP, or change include=")
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self._sel.params)]

    @property
    def skipped_steps(self) -> int:
        """Steps whose perturbation was skipped for a non-finite ascent gradient."""
        return self._skipped_host + int(self._sel.skipped_device)

    def _finite_or_handle(self, dnorms: torch.Tensor) -> bool:
        if self.nonfinite == "skip" and (torch.compiler.is_compiling() or _capturing(dnorms)):
            # Inside a compiled step or a CUDA-graph capture: no host sync (it would break the
            # graph). The skip happens on the device: a non-finite step leaves the weights at the
            # backup (v = 0) and is counted in a device tensor, read by ``skipped_steps``; no
            # warning is emitted.
            self._sel.keep_if(torch.isfinite(dnorms).all())
            return True
        if bool(torch.isfinite(dnorms).all()):
            return True
        self._sel.restore()
        self._skipped_host += 1
        msg = ("AWP: the ascent gradient is not finite (inf/NaN in the closure's loss or its backward); "
               "the weights were restored exactly")
        if self.nonfinite == "raise":
            raise FloatingPointError(msg + ". Lower the learning rate or gamma, or pass nonfinite='skip'.")
        warnings.warn(f"{msg} and this step's perturbation is skipped ({self.skipped_steps} skipped so far).",
                      RuntimeWarning, stacklevel=3)
        return False

    def perturb(self, closure: Callable[[], torch.Tensor]) -> bool:
        """Compute the ascent direction from ``closure()`` and perturb the selected weights.

        Returns True when the weights are now perturbed, False when the step was skipped
        (all gammas 0, or a non-finite ascent gradient with ``nonfinite="skip"``).
        """
        if self._sel.active:
            raise RuntimeError(
                "AWP.perturb() called while the weights are already perturbed: call step() or "
                "restore() first (or use `with awp.perturbed(closure):`)")
        if not self._update_sizes():
            return False  # gamma 0: no ascent pass at all
        grads = self._ascent_grads(closure)
        dn = self._sel.perturb(grads, self.eps)
        if not self._finite_or_handle(dn):
            return False
        try:
            for _ in range(self.steps - 1):
                grads = self._ascent_grads(closure)
                dn = self._sel.ascent_step(grads, self.eps)
                if not self._finite_or_handle(dn):
                    return False
        except BaseException:
            self._sel.restore()
            raise
        self.perturb_count += 1
        self.last_direction_norms = dn
        return True

    def restore(self) -> bool:
        """Put back the unperturbed weights, bit-exactly. Returns False if nothing was perturbed."""
        if not self._sel.active:
            return False
        self._sel.restore()
        return True

    @contextlib.contextmanager
    def perturbed(self, closure: Callable[[], torch.Tensor]):
        """``perturb(closure)`` on entry; on an exception inside, or on exit without ``step()``
        (e.g. a GradScaler-skipped step), the weights are restored exactly."""
        self.perturb(closure)
        try:
            yield self
        finally:
            if self._sel.active:
                self._sel.restore()

    # ----------------------------------------------------------------- step
    def step(self, closure=None):
        """The base optimizer's step, with the perturbation removed in the configured order.

        Runs the ``torch.optim`` step hooks itself (instead of torch's profiling wrapper, which
        Dynamo does not trace), so a compiled training step inlines it."""
        args, kwargs = (self,) if closure is None else (self, closure), {}
        for hook in chain(_optim_mod._global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
            result = hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"a step pre-hook must return None or (args, kwargs), got {result!r}")
                args, kwargs = result
        with torch.no_grad():
            out = self._step(*args[1:], **kwargs)
        self._optimizer_step_code()
        for hook in chain(self._optimizer_step_post_hooks.values(), _optim_mod._global_optimizer_post_hooks.values()):
            hook(self, args, kwargs)
        return out

    def _step(self, closure=None):
        base_step = (lambda: self.optimizer.step(closure)) if closure is not None else self.optimizer.step
        if not self._sel.active:
            return base_step()
        if self.restore_mode == "before_step":
            self._sel.restore()
            return base_step()
        try:
            ret = base_step()
        except BaseException:
            self._sel.restore()
            raise
        self._sel.unperturb()
        return ret

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self):
        if self._sel.active:
            raise RuntimeError("AWP.state_dict() called while the weights are perturbed: the model holds "
                               "w + v. Call step() or restore() first, then save.")
        return {"base_optimizer": self.optimizer.state_dict(),
                "awp": {"skipped_steps": self.skipped_steps, "perturb_count": self.perturb_count,
                        "default_gamma": self._default_gamma, "steps": self.steps,
                        "step_size": self.step_size, "restore": self.restore_mode}}

    def load_state_dict(self, state_dict):
        if self._sel.active:
            raise RuntimeError("AWP.load_state_dict() called while the weights are perturbed: call step() "
                               "or restore() first.")
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if "base_optimizer" in state_dict:
            self.optimizer.load_state_dict(state_dict["base_optimizer"])
            awp = state_dict.get("awp", {})
            self._skipped_host = int(awp.get("skipped_steps", 0))
            self._sel.skipped_device.zero_()
            self.perturb_count = int(awp.get("perturb_count", 0))
        elif "state" in state_dict and "param_groups" in state_dict:  # a plain base-optimizer checkpoint
            self.optimizer.load_state_dict(state_dict)
        else:
            raise ValueError("not an optimizer state dict: expected AWP.state_dict() output or a plain "
                             "torch.optim state dict with 'state' and 'param_groups'")
        for g in self.optimizer.param_groups:
            g.setdefault("awp_gamma", self._default_gamma)
        self._size_key = None


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_gamma(gamma, what):
    try:
        ok = float(gamma) >= 0 and float(gamma) < float("inf")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{what} must be a finite number >= 0 (0 disables AWP), got {gamma!r}")
