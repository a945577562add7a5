"""The engine behind every weight-perturbation rule: any ``torch.optim`` optimizer becomes an
AWP (SAM, Box AWP) optimizer.

Per training step (``x_adv`` already found by an attack)::

    awp.perturb(lambda: F.cross_entropy(model(x_adv), y))   # w <- w + v, BN stats and .grad untouched
    awp.zero_grad()
    F.cross_entropy(model(x_adv), y).backward()             # gradient at w + v
    awp.step()                                              # base step, then remove v

or, restoring on any exception (and when ``step()`` is never reached)::

    with awp.perturbed(closure):
        ...; loss.backward(); awp.step()

Structure: :class:`WeightPerturbation` is the engine shared by every rule (sharing
``param_groups``/``state`` with the base optimizer, step hooks, restore orders, the
``perturbed()`` context, ``state_dict`` nesting, the ascent gradient with BatchNorm statistics
frozen, DDP / FSDP2 detection and gradient sync, micro-batch accumulation, non-finite
handling, following the optimizer's parameters); where the ascent direction comes from (closure,
``accumulate()``, an attack built with ``awp=``, ``.grad``, ``ascent_every``'s stored direction)
is :mod:`awpfast.ascent`. A rule (:class:`awpfast.AWP`, :class:`awpfast.SAM`,
:class:`awpfast.BoxAWP`, one module each in :mod:`awpfast.rules`) owns its math and applies it
through the seam, behind five hooks (see :class:`WeightPerturbation`). ``rules`` imports this module, never the
reverse.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from itertools import chain
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.optim.optimizer as _optim_mod
from torch import nn

from .ascent import Ascent, Closure, backward_in_closure_advice, check_ascent_every, frozen_batchnorm_stats
from .compiled import _eager_under_old_dynamo
from .distributed import Setting, detect
from .perturb import PerturbState, default_include, flat_like

__all__ = ["WeightPerturbation", "frozen_batchnorm_stats"]

_RESTORE_MODES = ("after_step", "before_step")
_STATE_KEY = "awpfast"  # the wrapper's own entry in its state dict, next to the base optimizer's

class WeightPerturbation(torch.optim.Optimizer):
    """The engine behind every weight-perturbation rule (:class:`awpfast.AWP`; :class:`awpfast.SAM`
    with ASAM; :class:`awpfast.BoxAWP`).

    It *is* a ``torch.optim.Optimizer`` that shares ``param_groups`` and ``state`` with the
    base optimizer. Protocol: ``perturb(closure)`` (ascent gradient, then the rule moves the
    selected weights from ``w`` to ``w + v``), the user's backward at ``w + v``, ``step()``
    (base step and removal of ``v`` in the configured order).

    A rule (one module of :mod:`awpfast.rules`) subclasses the engine and implements its **five
    hooks**:

    1. ``_rule_active() -> bool``: whether this ``perturb()`` perturbs at all (False skips the
       ascent pass: gamma 0, a warm-up, Box AWP before ``start``); it also refreshes the rule's
       per-group sizes when the param groups, the selection or its layout changed;
    2. ``_rule_apply(dirs, first) -> norms``: apply the perturbation from the flat ascent
       directions (``first``: the first ascent pass, which writes the backups; later passes of a
       multi-step rule move around them) through the rule's functional core; returns the direction
       norms;
    3. ``_rule_check(norms) -> tensor or None``: what the non-finite check looks at (default: the
       norms; None: no whole-step check, the rule handles non-finite directions itself);
    4. ``_rule_config() -> dict``: the rule's settings, saved in the state dict and compared on load
       (except the keys named in ``_uncompared``: progress, or defaults the param groups carry);
    5. ``_rule_load(meta)``: after ``load_state_dict`` (``meta``: the wrapper's saved entry, or None).

    and sets class data: ``rule_name``; ``passes`` (ascent passes per ``perturb()``, default 1);
    ``grad_source`` (True: ``perturb()`` without a closure and with nothing accumulated takes the
    direction from ``.grad``, the clean gradient of the batch: no extra pass; under DDP it is
    already averaged by DDP's own backward, so no further collective runs); ``off_hint`` (how a user
    switches it off); ``later_hint`` (the message when several passes have no closure to re-run).
    The param-group keys a rule reads (``awp_gamma``, ``sam_rho``) are its ``extra_defaults``: set in
    every param group, also in groups added or loaded later.

    ``ascent_every=K`` (K > 1): the direction is computed on the 0th, K-th, 2K-th... ``perturb()``
    call with the rule active (and whenever none is stored for the current selection, or the last
    one was not finite); the calls in between run no closure and re-use the stored direction,
    re-scaled by the rule to the current weights. Memory: one copy of the selected weights (their
    local shards under FSDP2), saved in ``state_dict()``.

    Selected parameters: the include rule, intersected with the parameters the base optimizer
    holds, restricted to those that require grad *now* (a ``requires_grad`` change after
    wrapping is followed at the next ``perturb()``).

    ``restore=None`` resolves to ``"after_step"``, or ``"before_step"`` for ``ascent_sync="local"``
    on several DDP ranks (where ``"after_step"`` is refused). ``store_deltas`` (default: for
    ``"after_step"``) keeps ``v`` for the reference restore order.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, *,
                 include: Optional[Callable[[str, nn.Parameter], bool]] = None,
                 restore: Optional[str] = None, backend: Optional[str] = None,
                 nonfinite: str = "skip", ascent_sync: str = "global", store_deltas: Optional[bool] = None,
                 extra_defaults: Optional[dict] = None, ascent_every: int = 1, ascent_fraction: float = 1.0,
                 ascent_seed: Optional[int] = None, ascent: str = "gradient"):
        name = type(self).__name__
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{name} wraps a torch.optim.Optimizer, got {type(optimizer).__name__}; build the base "
                            f"optimizer first, e.g. {name}(torch.optim.SGD(model.parameters(), lr=0.1), model)")
        if isinstance(optimizer, WeightPerturbation):
            raise TypeError(f"the optimizer is already a {type(optimizer).__name__} wrapper; wrap the base "
                            "optimizer only once")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if restore is not None and restore not in _RESTORE_MODES:
            raise ValueError(f"restore must be one of {_RESTORE_MODES}, got {restore!r}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if backend is not None:
            from .ops import BACKENDS
            if backend not in BACKENDS:
                raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or None")
        setting = detect(model, ascent_sync)
        local_multi = setting.kind == "ddp" and setting.sync == "local" and setting.world_size > 1
        if restore is None:
            restore = "before_step" if local_multi else "after_step"
        elif restore == "after_step" and local_multi:
            raise ValueError(
                "restore='after_step' with ascent_sync='local' under DDP would take the base step at w + v, "
                "and v differs per rank (weight decay and rounding see each rank's own v): the replicas would "
                "drift apart. Use restore='before_step' (exact restore, then the step; the default in local "
                "mode) or ascent_sync='global'")

        self.optimizer = optimizer
        self.model = model
        self.restore_mode, self.nonfinite = restore, nonfinite
        self.include = include or default_include
        self._setting: Setting = setting
        self._group_key = self._param_group_key()
        named = self._candidates(first=True)
        meta = [n for n, p in named if p.is_meta]
        if meta:
            raise ValueError(f"{name}: {len(meta)} selected parameter(s) are on the meta device (not materialized), "
                             f"e.g. {meta[0]}: materialize the model first (model.to_empty(device=...) and "
                             "initialize it, or load its weights), then build the optimizer and the wrapper")
        self._warn_foreign_params()
        self._sel = PerturbState(
            named, store_deltas=(restore == "after_step") if store_deltas is None else store_deltas,
            backend=backend, model=None if setting.sharded else setting.module,
            reduce=setting.all_reduce_sum if setting.sharded else None)
        self._report_selection()
        self._skipped_host = 0
        self._ascent = Ascent(self._sel, setting, model, optimizer, name, check_ascent_every(ascent_every),
                              ascent_fraction, ascent_seed, ascent)  # where the direction comes from
        self._perturb_called = False  # perturb() since the last step(); a plain step() warns once
        self._warned = set()
        self.perturb_count = 0
        self.last_direction_norms: Optional[torch.Tensor] = None
        # torch.optim.Optimizer bookkeeping without re-adding the base's parameters
        self._extra_defaults = dict(extra_defaults or {})
        self.defaults = dict(optimizer.defaults, **self._extra_defaults)
        self._fill_group_defaults()
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
    def perturbed_parameters(self) -> List[str]:
        """Names of the parameters currently perturbed (include rule, optimizer's parameters,
        ``requires_grad``), relative to the unwrapped module (no DDP ``module.`` prefix)."""
        self._sync_selection()
        return list(self._sel.names)

    @property
    def is_perturbed(self) -> bool:
        """Whether the weights are at ``w + v`` now."""
        return self._sel.active

    @property
    def distributed(self) -> Setting:
        """The detected setting: ``.kind`` (``plain``, ``ddp``, ``fsdp2``), ``.world_size``, ``.sync``."""
        return self._setting

    def add_param_group(self, param_group):
        """Add a group to the base optimizer (its parameters join the selection)."""
        self.optimizer.add_param_group(param_group)
        self._fill_group_defaults()

    def _fill_group_defaults(self) -> None:
        """The rule's param-group keys (its ``extra_defaults``) in every group that lacks them."""
        for g in self.optimizer.param_groups:
            for k, v in self._extra_defaults.items():
                g.setdefault(k, v)

    def zero_grad(self, set_to_none: bool = True):
        """The base optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ----------------------------------------------------------------- selection
    def _param_group_key(self):
        # Loops, not comprehensions, in the bookkeeping that runs every step: after the ascent's
        # graph break Dynamo runs these methods eagerly and tries each comprehension (its own frame
        # on Python < 3.12) as a frame of its own, which it cannot compile ("falling back to eager").
        key = []
        for g in self.optimizer.param_groups:
            key.append((id(g), len(g["params"])))
        return tuple(key)

    def _candidates(self, first: bool = False):
        """Include rule ∩ the optimizer's parameters, in model order (frozen ones included:
        they join when unfrozen)."""
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        module = self._setting.module
        named = list(module.named_parameters())
        if not any(id(p) in held for _, p in named):
            raise ValueError(
                f"the optimizer holds none of the model's parameters: build it on this model's parameters, "
                f"e.g. {type(self).__name__}(torch.optim.SGD(model.parameters(), lr=0.1), model)"
                + (" (under FSDP2: after fully_shard)" if self._setting.kind == "fsdp2" else ""))
        cands = [(n, p) for n, p in named if id(p) in held and self.include(n, p)]
        if not cands and first:
            raise ValueError(
                f"{type(self).__name__} selected no parameters: the include rule matched none of the "
                "parameters the optimizer holds (the default takes those with ndim > 1 and 'weight' in the "
                "name). Pass include=lambda name, p: ... to choose them.")
        return cands

    def _warn_foreign_params(self) -> None:
        """Warn once when the optimizer holds parameters that are not the model's (they are stepped by
        the base optimizer but never perturbed)."""
        mine = {id(p) for p in self._setting.module.parameters()}
        foreign = [p for g in self.optimizer.param_groups for p in g["params"] if id(p) not in mine]
        if foreign:
            shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            warnings.warn(f"{type(self).__name__}: the optimizer holds {len(foreign)} parameter(s) that are not in the "
                          f"model (shapes {shapes}); the base optimizer steps them, but they are never perturbed. "
                          "Pass the module that owns them as model= if they should be.", UserWarning, stacklevel=4)

    def _report_selection(self) -> None:
        """Log once (logger ``awpfast``, when the wrapper is built) what the selection leaves out,
        by category with counts; WARNING when it leaves out tensors with ndim >= 2 (a ViT's
        ``pos_embed`` and ``cls_token`` lack "weight" in their names)."""
        import logging
        from .perturb import left_out, left_out_message
        held = set()
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                held.add(id(p))
        cats = left_out(list(self._setting.module.named_parameters()), self.include, held)
        level, msg = left_out_message(type(self).__name__, len(self._sel.params), cats,
                                      self.include is default_include)
        logging.getLogger("awpfast").log(level, msg)

    def _sync_selection(self) -> None:
        """Follow the optimizer's param groups, ``requires_grad`` changes and new storage
        (never inside a perturbed region: the backups belong to the current selection)."""
        if self._sel.active:
            return
        key = self._param_group_key()
        if key != self._group_key:
            self._sel.set_candidates(self._candidates())
            self._group_key = key
        else:
            self._sel.refresh()

    # ----------------------------------------------------------------- rule interface
    rule_name = "WeightPerturbation"
    passes = 1              # ascent passes per perturb()
    grad_source = False     # perturb() without a closure may use .grad (SAM, Box AWP)
    off_hint = "gamma 0"    # how a user switches this rule off (named in the plain-step warning)
    later_hint = ("{name} with {passes} ascent steps re-evaluates the loss at w + v: pass the micro-batch "
                  "closures as a list, perturb([c1, c2, ...]), instead of accumulate()")
    _uncompared: tuple = ()  # _rule_config() keys saved but not compared on load

    def _rule_active(self) -> bool:
        raise NotImplementedError

    def _rule_apply(self, dirs: List[torch.Tensor], first: bool) -> torch.Tensor:
        raise NotImplementedError

    def _rule_check(self, dnorms: torch.Tensor) -> Optional[torch.Tensor]:
        """The tensor whose non-finiteness skips the whole step (None: no check)."""
        return dnorms

    def _rule_config(self) -> dict:
        return {}

    def _rule_load(self, meta: Optional[dict]) -> None:
        pass

    # ----------------------------------------------------------------- helpers for the rules
    def _group_values_key(self, name: str) -> tuple:
        """What a rule's per-group sizes depend on: each param group's ``name`` value, the selection
        and its layout. Compared once per step (a small tuple; plain loops, see _param_group_key)."""
        key = []
        for g in self.optimizer.param_groups:
            key.append((id(g), g.get(name)))
        return (tuple(key), self._sel.generation, self._sel.layout_version)

    def _set_all(self, name: str, value: float, check) -> None:
        """Set param-group key ``name`` (a rule's size: ``awp_gamma``, ``sam_rho``) in every group."""
        check(value, name.split("_", 1)[1])
        for g in self.optimizer.param_groups:
            g[name] = float(value)

    def _per_parameter(self, name: str, default: float, check, what: str) -> List[float]:
        """Each selected parameter's value of param-group key ``name`` (``check``-ed, one-line
        errors naming ``what``), in selection order; ``default`` for a parameter of no group."""
        per_param = {}
        for g in self.optimizer.param_groups:
            val = g.get(name, default)
            check(val, what)
            for p in g["params"]:
                per_param[id(p)] = float(val)
        out = []
        for p in self._sel.params:
            out.append(per_param.get(id(p), default))
        return out

    # ----------------------------------------------------------------- non-finite
    @property
    def skipped_steps(self) -> int:
        """Steps whose perturbation was skipped for a non-finite ascent gradient."""
        dev = self._sel.skipped_device
        return self._skipped_host + (0 if dev is None else int(dev))

    def _finite_or_handle(self, dnorms: torch.Tensor) -> bool:
        dnorms = self._rule_check(dnorms)
        if dnorms is None:
            return True
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
        msg = (f"{type(self).__name__}: the ascent gradient is not finite (inf/NaN in the closure's loss or its "
               "backward); the weights were restored exactly")
        if self.nonfinite == "raise":
            raise FloatingPointError(msg + ". Lower the learning rate or gamma, or pass nonfinite='skip'.")
        warnings.warn(f"{msg} and this step's perturbation is skipped ({self.skipped_steps} skipped so far).",
                      RuntimeWarning, stacklevel=3)
        return False

    # ----------------------------------------------------------------- perturb
    def perturb(self, closure: Union[Closure, Sequence[Closure], None] = None) -> bool:
        """Compute the ascent direction and perturb the selected weights (``w <- w + v``).

        ``closure``: a callable returning the ascent loss; or a list of callables (micro-batches:
        the direction is the gradient of the sum of their losses, and multi-step ascent re-runs
        them all); or None to apply the direction gathered by ``accumulate()`` or by an attack
        built with ``awp=`` (while the rule is inactive, e.g. gamma 0, None simply returns False).
        With ``ascent_every=K`` the closure is not called on the steps that re-use the stored
        direction.

        Returns True when the weights are now perturbed, False when this step's perturbation was
        skipped (rule inactive, e.g. gamma 0; a non-finite ascent gradient with
        ``nonfinite="skip"``; no selected parameter requires grad).
        """
        return self._perturb(closure)

    def _perturb(self, closure, later=None) -> bool:
        """``perturb()``; ``later`` (a closure or a list) gives the directions of the ascent passes
        after the first one (default: ``closure``'s)."""
        name = type(self).__name__
        if self._sel.active:
            raise RuntimeError(
                f"{name}.perturb() called while the weights are already perturbed: call step() or "
                "restore() first (or use `with awp.perturbed(closure):`)")
        self._perturb_called = True
        self._sync_selection()
        if self._setting.averages_ascent or self._setting.sharded:
            self._setting.check_group()  # before the closure runs: nothing changes on this error
        closures = None if closure is None else _closure_tuple(
            closure, "perturb() needs a closure returning the ascent loss (or a list of them, or nothing after "
                     "accumulate())")
        # the later passes' closures, validated before an accumulated direction is consumed
        nexts = closures if later is None else _closure_tuple(
            later, "later must be a closure returning the loss (or a list of them)")
        asc = self._ascent
        pending = asc.pending if asc.pending_gen == self._sel.generation else None
        asc.pending = None
        if closures is not None and pending is not None:
            raise RuntimeError(f"{name}.perturb(closure) after accumulate(): the accumulated direction would be "
                               "lost; call perturb() without a closure to apply it")
        if not self._sel.params:
            self._warn_once("nosel", f"{name}: no selected parameter requires grad (all frozen?); nothing is "
                                     "perturbed this step")
            return False
        if not self._rule_active():
            return False  # e.g. gamma 0: no ascent pass at all
        if asc.source == "momentum":
            if closures is not None or pending is not None:
                raise TypeError(f"{name}(ascent='momentum') takes the direction from the base optimizer's momentum: "
                                "call perturb() without a closure (and without accumulate() or an attack's awp=)")
            pending = asc.momentum_directions()
            if pending is None:
                self._warn_once("nomomentum", f"{name}(ascent='momentum'): the base optimizer has no momentum yet "
                                              "(before its first step); this step is not perturbed")
                return False
        reuse = pending is None and asc.reuse_due()  # ascent_every: no closure runs this step
        from_grad = closures is None and pending is None and not reuse
        if from_grad and not self.grad_source:
            raise TypeError(f"{name}.perturb() without a closure applies the direction gathered by "
                            "accumulate(closure) (or by an attack built with awp=), and nothing was accumulated; "
                            "pass the ascent closure")
        passes = self.passes
        if nexts is None and passes > 1:
            raise ValueError(self.later_hint.format(name=name, passes=passes))
        if reuse:
            dirs = asc.stored
        elif from_grad:
            dirs = asc.grad_directions()  # already what the user's backward made of it: no sync
        elif asc.source == "momentum":
            dirs = pending  # built from synced gradients: equal on every rank already
        else:
            try:
                dirs = asc.synced(pending if closures is None else asc.directions(closures))
            except RuntimeError as e:
                advice = backward_in_closure_advice(self, e)
                if advice is e:
                    raise
                raise advice from None
        asc.calls += 1
        if asc.every > 1 and not reuse:
            asc.store(dirs)
        dn = self._rule_apply(dirs, True)
        ok = False
        try:
            ok = self._finite_or_handle(dn)
        finally:
            if not ok:
                asc.stored = None  # a non-finite direction is not re-used
        if not ok:
            return False
        try:
            for _ in range(passes - 1):
                dn = self._rule_apply(asc.synced(asc.directions(nexts)), False)
                if not self._finite_or_handle(dn):
                    return False
        except BaseException:
            self._sel.restore()
            raise
        self.perturb_count += 1
        self.last_direction_norms = dn
        return True

    # ----------------------------------------------------------------- the ascent (an Ascent object)
    @property
    def ascent_every(self) -> int:
        return self._ascent.every

    @property
    def ascent_fraction(self) -> float:
        return self._ascent.fraction

    @property
    def ascent_source(self) -> str:
        return self._ascent.source

    def ascent_direction(self, closure: Closure) -> List[torch.Tensor]:
        """The exact ascent direction of ``closure`` at the current weights, without perturbing:
        one tensor per selected parameter (``perturbed_parameters`` order), shaped like its local
        data, synced over the ranks as ``perturb()`` would (``ascent_sync="global"``). BatchNorm
        statistics, ``.grad``, a pending direction and the sub-batch generator are untouched; a
        sub-batch closure gets every row. Meant for diagnostics such as :meth:`direction_cosines`."""
        if self._sel.active:
            raise RuntimeError(f"{type(self).__name__}.ascent_direction() called while the weights are perturbed: "
                               "call it before perturb()")
        self._sync_selection()
        dirs = self._ascent.synced(self._ascent.closure_directions(closure, full=True))
        return [d.view_as(t) if t.is_contiguous() else d for d, t in zip(dirs, self._sel.local)]

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
        self._ascent.add_pending(self._ascent.closure_directions(closure))

    def direction_request(self, who: str) -> Optional[List[torch.Tensor]]:
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
        if not self._sel.params or not self._rule_active() or self._ascent.reuse_due():
            return None
        return list(self._sel.params)

    def add_direction(self, grads: Sequence[Optional[torch.Tensor]]) -> None:
        """The gradients of :meth:`direction_request`'s parameters (None: not connected) join the
        pending direction, exactly as ``accumulate()``'s would."""
        self._ascent.add_direction(grads)

    def direction_cosines(self, exact: Sequence[torch.Tensor]) -> torch.Tensor:
        """While perturbed: the cosine, per selected parameter, between the perturbation ``v``
        applied (``w + v`` minus the backup) and ``exact`` (e.g. :meth:`ascent_direction`'s output,
        computed before ``perturb()``), as a float64 CPU vector (NaN where either is zero). A
        diagnostic of cheap ascents: 1 for the exact direction. Under FSDP2 the dot products and
        norms are summed over the shards. One host sync."""
        if not self._sel.active:
            raise RuntimeError(f"{type(self).__name__}.direction_cosines() needs the weights perturbed: call it "
                               "after perturb() returned True, before step()")
        vs = self._sel.perturbation()
        if len(exact) != len(vs):
            raise ValueError(f"direction_cosines() needs one tensor per selected parameter ({len(vs)}), "
                             f"got {len(exact)}")
        parts = torch.stack([torch.stack([(v.double() * flat_like(e, t).double()).sum(), v.double().square().sum(),
                                          e.double().square().sum()])
                             for v, e, t in zip(vs, exact, self._sel.local)]).cpu()
        if self._setting.sharded:
            parts = self._setting.all_reduce_sum(parts.to(self._sel.local[0].device)).cpu()
        den = (parts[:, 1] * parts[:, 2]).sqrt()
        return torch.where(den > 0, parts[:, 0] / den, torch.full_like(den, float("nan")))

    def restore(self) -> bool:
        """Put back the unperturbed weights, bit-exactly. Returns False if nothing was perturbed."""
        if not self._sel.active:
            return False
        self._sel.restore()
        return True

    @contextlib.contextmanager
    def perturbed(self, closure: Union[Closure, Sequence[Closure], None] = None, **kwargs):
        """``perturb(closure, **kwargs)`` on entry; on an exception inside, or on exit without
        ``step()`` (e.g. a GradScaler-skipped step), the weights are restored exactly."""
        self.perturb(closure, **kwargs)
        try:
            yield self
        finally:
            if self._sel.active:
                self._sel.restore()

    # ----------------------------------------------------------------- step
    def step(self, closure=None):
        """The base optimizer's step, with the perturbation removed in the configured order.

        Without a ``perturb()`` since the last step this is a plain base step (warned once);
        ``step(closure)`` hands the closure to the base optimizer (it does not perturb: this is
        not SAM's two-pass ``step(closure)``).

        Runs the ``torch.optim`` step hooks itself (instead of torch's profiling wrapper, which
        Dynamo does not trace), so a compiled training step inlines it."""
        if not self._perturb_called:
            self._warn_plain_step(closure is not None)
        self._perturb_called = False
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

    def _warn_plain_step(self, with_closure: bool) -> None:
        name = type(self).__name__
        if with_closure:
            self._warn_once("closure", f"{name}.step(closure) without perturb(): the closure goes to the base "
                                       "optimizer and the step is a plain one, with no weight perturbation. The "
                                       "protocol is perturb(ascent_closure) -> backward at w + v -> step() (not "
                                       "SAM's step(closure)). This warning is shown once.")
        else:
            self._warn_once("plain", f"{name}.step() without perturb() since the last step: a plain base-optimizer "
                                     "step, with no weight perturbation. Call perturb(closure) before the backward "
                                     f"({self.off_hint} is the way to switch the perturbation off). This warning "
                                     "is shown once.")

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, UserWarning, stacklevel=4)

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
    def _meta(self) -> dict:
        return {"rule": self.rule_name, "format": 2, "skipped_steps": self.skipped_steps,
                "perturb_count": self.perturb_count, "restore": self.restore_mode,
                "ascent_sync": self._setting.sync, **self._rule_config(), **self._ascent.meta()}

    def state_dict(self):
        """The base optimizer's state dict (``state``, ``param_groups``, loadable by the base
        optimizer class itself) plus one ``"awpfast"`` entry with the wrapper's counters and
        settings."""
        if self._sel.active:
            raise RuntimeError(f"{type(self).__name__}.state_dict() called while the weights are perturbed: the "
                               "model holds w + v. Call step() or restore() first, then save.")
        sd = dict(self.optimizer.state_dict())
        if _STATE_KEY in sd:
            raise RuntimeError(f"the base optimizer's state dict already has a {_STATE_KEY!r} entry")
        sd[_STATE_KEY] = self._meta()
        return sd

    def load_state_dict(self, state_dict):
        """Load ``state_dict()`` output or a plain base-optimizer state dict. Settings that differ from the checkpoint's
        (``steps``, ``restore``, ``ascent_every``...) are kept as constructed, with a warning naming
        them. A state dict of another optimizer type or of other parameter shapes is refused (a
        ``ValueError``, the wrapper unchanged)."""
        name = type(self).__name__
        if self._sel.active:
            raise RuntimeError(f"{name}.load_state_dict() called while the weights are perturbed: call step() "
                               "or restore() first.")
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        _check_state_dict_shape(state_dict, name)
        if "state" in state_dict and "param_groups" in state_dict:
            base = {k: v for k, v in state_dict.items() if k != _STATE_KEY}
            meta = state_dict.get(_STATE_KEY)
        else:
            raise ValueError("not an optimizer state dict: expected AWP.state_dict() output or a plain "
                             "torch.optim state dict with 'state' and 'param_groups'")
        _check_base_fits(self.optimizer, base, name)
        direction = None if meta is None else self._ascent.check_meta(meta, self._sync_selection)
        self.optimizer.load_state_dict(base)
        if meta is not None:
            self._check_meta(meta)
            self._ascent.load_meta(meta, direction)
            self._skipped_host = int(meta.get("skipped_steps", 0))
            if self._sel.skipped_device is not None:
                self._sel.skipped_device.zero_()
            self.perturb_count = int(meta.get("perturb_count", 0))
        self._fill_group_defaults()
        self._rule_load(meta)

    def _check_meta(self, meta: dict) -> None:
        mine = dict(self._meta(), ascent_every=self.ascent_every, ascent_fraction=self.ascent_fraction,
                    ascent=self.ascent_source)
        meta = dict(meta, ascent_every=meta.get("ascent_every", 1), ascent_fraction=meta.get("ascent_fraction", 1.0),
                    ascent=meta.get("ascent", "gradient"))
        keys = ["rule", "restore", "ascent_sync", "ascent_every", "ascent_fraction", "ascent",
                *(k for k in self._rule_config() if k not in self._uncompared)]
        diff = [k for k in keys if k in meta and meta[k] != mine[k]]
        if diff:
            warnings.warn(
                f"{type(self).__name__}.load_state_dict: the checkpoint was saved with "
                + ", ".join(f"{k}={meta[k]!r}" for k in diff) + "; this wrapper has "
                + ", ".join(f"{k}={mine[k]!r}" for k in diff)
                + ". Continuing with the current settings (build the wrapper with the checkpoint's settings "
                "to resume the same training).", UserWarning, stacklevel=3)


# param-group flags that torch fills in when an older state dict lacks them (not a sign of another type)
_FILLED_BY_TORCH = {"foreach", "maximize", "differentiable", "fused", "capturable", "decoupled_weight_decay",
                    "param_names", "initial_lr"}


def _check_state_dict_shape(sd: dict, who: str) -> None:
    """A one-line ValueError for a dict that is not laid out as an optimizer state dict (before any
    of it is read): ``state`` a dict of dicts, ``param_groups`` a list of dicts with a ``params`` list."""
    state, groups = sd.get("state"), sd.get("param_groups")
    if state is None and groups is None:
        return  # not an optimizer state dict at all: load_state_dict says so
    bad = None
    if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
        bad = f"'state' must be a dict of per-parameter dicts, got {type(state).__name__}"
    elif not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), (list, tuple))
                                                  for g in groups):
        bad = "'param_groups' must be a list of dicts, each with a 'params' list"
    meta = sd.get(_STATE_KEY)
    if bad is None and meta is not None and not isinstance(meta, dict):
        bad = f"its {_STATE_KEY!r} entry must be a dict, got {type(meta).__name__}"
    if bad:
        raise ValueError(f"{who}.load_state_dict: not an optimizer state dict ({bad}); load what state_dict() "
                         "returned")


def _check_base_fits(opt: torch.optim.Optimizer, sd: dict, who: str) -> None:
    """Refuse, before anything is loaded, a base state dict saved by another optimizer type (its
    param groups lack this optimizer's hyper-parameters, or its per-parameter state has other
    entries) or for parameters of other shapes. Group-size mismatches are left to torch's own error."""
    kind = type(opt).__name__
    groups, saved = opt.param_groups, sd.get("param_groups")
    if not isinstance(saved, list) or len(saved) != len(groups) or any(
            not isinstance(s, dict) or len(s.get("params", ())) != len(g["params"]) for s, g in zip(saved, groups)):
        return
    need = set(opt.defaults) - _FILLED_BY_TORCH
    for s in saved:
        missing = sorted(need - set(s))
        if missing:
            extra = sorted(set(s) - set(groups[0]) - {"params"} - _FILLED_BY_TORCH)
            raise ValueError(f"{who}.load_state_dict: the state dict is not a {kind} one (its param groups lack "
                             f"{missing}{f' and have {extra}' if extra else ''}): load a state dict saved from "
                             f"{kind}, or wrap the optimizer type that saved it")
    state = sd.get("state", {})
    mine = next((set(st) for st in opt.state.values() if st), None)  # this type's state entries, once stepped
    for s, g in zip(saved, groups):
        for pid, p in zip(s["params"], g["params"]):
            st = state.get(pid)
            if not isinstance(st, dict):
                continue
            if mine and st and not set(st) & mine:
                raise ValueError(f"{who}.load_state_dict: the state dict's per-parameter state has "
                                 f"{sorted(st)}, this {kind} keeps {sorted(mine)}: load a state dict saved "
                                 f"from {kind}, or wrap the optimizer type that saved it")
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"{who}.load_state_dict: the state dict's {k!r} of parameter {pid} has shape "
                                     f"{tuple(v.shape)}, the parameter {tuple(p.shape)}: it was saved for a model "
                                     "with other parameter shapes; load it into the same architecture")


def _closure_tuple(value, what: str) -> tuple:
    """A closure or a non-empty list of closures as a tuple; else TypeError ``what, got TYPE``."""
    if callable(value):
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(callable(c) for c in value):
        return tuple(value)
    raise TypeError(f"{what}, got {type(value).__name__}")


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


_eager_under_old_dynamo(WeightPerturbation)
