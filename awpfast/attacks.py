"""Adversarial attacks for adversarial training: PGD (L-inf / L2) and the TRADES KL attack.

Conventions (the ones torchattacks users know):

* inputs live in [0, 1] (checked: values outside raise a ``ValueError``, at the cost of one
  host sync per call; ``check_range=False`` skips it); any normalization lives inside the model;
* ``eps``, ``alpha``, ``steps``, ``random_start``;
* the model is put in eval mode for the attack and the caller's mode is restored
  afterwards (``bn_train=True`` keeps it in train mode instead, as the reference AT recipe
  of Rice et al. / Wu et al. does; BatchNorm running statistics are then updated by the
  attack forwards exactly as in that recipe);
* only the *input* gradient is computed (``torch.autograd.grad`` w.r.t. the adversarial
  batch): no parameter gradient is computed, and nothing is accumulated in any ``.grad``;
* every step goes through the seam's fused op :func:`awpfast.ops.pgd_step_`, whose order
  is the established one: L-inf ``x' = clip01(x + clip_eps(x' + alpha*sign(g) - x))``;
  L2 ``g/(||g||+1e-10)`` per sample, step, renorm ``delta`` to ``||delta|| <= eps``, clip01;
* the result is detached.

**Attack-sourced AWP direction** (``awp=``, any awpfast weight-perturbation wrapper, e.g.
:class:`awpfast.AWP`): the attack's *last* step differentiates its loss at the last iterate
``x^(K-1)`` with respect to the input *and* the wrapper's selected weights in one backward
(``torch.autograd.grad(loss, [x] + weights)``), in the attack's own mode (eval, or train with
``bn_train=True``; BatchNorm statistics behave as in the same attack without ``awp=``), and hands
the weight gradient to the wrapper as a pending direction, exactly as ``awp.accumulate()`` would
(two attack calls before one ``perturb()`` add up; under DDP ``ascent_sync="global"`` averages it
over the ranks at ``perturb()``). ``x_adv`` is bit-identical to the attack without ``awp=``; no
``.grad`` is touched. Then ``awp.perturb()`` *without* a closure applies it: one forward and one
backward fewer per step than a separate ascent pass, at the price of the direction being taken at
``x^(K-1)`` in the attack's mode instead of at ``x_adv`` in train mode (an approximation, measured
in docs/reproduction.md). The loss's scale and reduction (mean or sum) do not matter to AWP: its
rule uses each layer's direction only. Nothing is computed when the wrapper needs no new
direction (gamma 0, e.g. a warm-up; a step of ``ascent_every`` that re-uses the stored one).
``steps=0`` with ``awp=`` is refused (there is no attack step); ``eps=0`` gives the gradient at the
clean input. Under FSDP2 it is refused: autograd cannot reach the sharded parameters (use the
separate ascent, ``awp.perturb(closure)``, with ``ascent_every=K`` to amortize it).

With ``random_start=False`` :class:`PGD` produces the same examples as torchattacks'
``PGD`` / ``PGDL2`` (mean cross-entropy, the same step / projection / clamp order).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .losses import _wide

__all__ = ["PGD", "TRADESAttack", "pgd", "trades_attack", "attack_mode", "L2_ORDERS"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
from .choices import L2_ORDERS  # noqa: E402  (the names, torch-free)


class attack_mode:
    """Put every submodule in eval (or train) mode; restore each one's own flag after.

    Restoring per module (not just ``model.train(was_training)``) keeps mixed modes that a
    caller set on purpose, e.g. a frozen BatchNorm inside a training model.

    A class, not a ``@contextmanager`` generator: inside a compiled training step the attack
    runs eagerly after its ``autograd.grad`` graph break, and Dynamo cannot compile a generator
    frame entered there (it falls back to eager on it).
    """

    def __init__(self, model: nn.Module, train: bool = False):
        self.model, self.train = model, train

    def __enter__(self) -> nn.Module:
        self.saved = []
        for m in self.model.modules():
            self.saved.append((m, m.training))
        self.model.train(self.train)
        return self.model

    def __exit__(self, *exc) -> None:
        for m, flag in self.saved:
            m.training = flag


def _input_grad(loss: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    # autograd.grad only runs the graph edges that lead to x_adv: convolution / linear
    # backward nodes skip their weight-gradient outputs and no AccumulateGrad node runs.
    if not loss.requires_grad:
        raise ValueError("the attack loss does not depend on the input (no grad_fn): the model must compute "
                         "its output from the input with gradients enabled (no torch.no_grad, no .detach())")
    (g,) = torch.autograd.grad(loss, [x_adv], only_inputs=True, allow_unused=True)
    if g is None:
        raise ValueError("the model's output does not depend on its input: an attack needs the input gradient "
                         "(check that forward() uses its argument)")
    return g


def _input_and_weight_grad(loss: torch.Tensor, x_adv: torch.Tensor, awp, weights) -> torch.Tensor:
    """The input gradient, and the selected weights' gradient handed to ``awp`` (one backward)."""
    if not loss.requires_grad:
        return _input_grad(loss, x_adv)  # raises its error
    gs = torch.autograd.grad(loss, [x_adv, *weights], only_inputs=True, allow_unused=True)
    if gs[0] is None:
        return _input_grad(loss, x_adv)
    awp.add_direction(list(gs[1:]))
    return gs[0]


def _check_sizes(who: str, eps, alpha, steps) -> None:
    for name, v in (("eps", eps), ("alpha", alpha)):
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        if isinstance(v, (bool, str)) or not (math.isfinite(f) and f >= 0):
            raise ValueError(f"{who}: {name} must be a finite number >= 0, got {v!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"{who}: steps must be an integer >= 0, got {steps!r}")


def _check_model(who: str, model) -> None:
    if not callable(model):
        raise TypeError(f"{who} needs the model to attack (an nn.Module mapping a [0, 1] batch to logits), got "
                        f"{type(model).__name__}")


def _check_awp(who: str, awp, steps: int):
    if awp is None:
        return None
    if not (callable(getattr(awp, "direction_request", None)) and callable(getattr(awp, "add_direction", None))):
        raise TypeError(f"{who}(awp=...) takes an awpfast weight-perturbation wrapper such as awpfast.AWP, got "
                        f"{type(awp).__name__}")
    if steps == 0:
        raise ValueError(f"{who}(awp=...) needs steps >= 1: the AWP direction is the last attack step's weight "
                         "gradient (for none, drop awp= and call awp.perturb(closure))")
    return awp


def _wanted(who: str, awp, steps: int):
    """The weights whose gradient this call's last step returns (None: no direction wanted)."""
    if awp is None:
        return None
    _check_awp(who, awp, steps)  # steps may have been changed since construction
    return awp.direction_request(who)


def _check_inputs(x: torch.Tensor, y: Optional[torch.Tensor], check_range: bool = True) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("attack inputs must be a floating-point tensor with values in [0, 1]")
    if x.dim() < 2:
        raise ValueError(f"attack inputs need a batch dimension, got shape {tuple(x.shape)}")
    if y is not None and y.shape[0] != x.shape[0]:
        raise ValueError(f"labels have {y.shape[0]} entries for a batch of {x.shape[0]}")
    if check_range and x.numel():
        lo, hi = torch.aminmax(x.detach())
        lo, hi = float(lo), float(hi)
        if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
            raise ValueError(
                f"attack inputs must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]: pass unnormalized "
                "images and put the normalization inside the model (e.g. awpfast.models.PreActResNet18("
                "mean=..., std=...)), or check_range=False if the range is deliberate")


class PGD:
    """Projected gradient descent (Madry et al.), L-inf or L2.

    Args:
        model: maps a [0, 1] batch to logits.
        eps: radius of the ball (L-inf: 8/255 by default; L2: use e.g. 0.5).
        alpha: step size.
        steps: number of steps.
        random_start: L-inf: uniform start in [-eps, eps]; L2: Gaussian direction with
            radius U(0, 1)*eps (both clamped to [0, 1]), as torchattacks.
        norm: ``"Linf"`` or ``"L2"``.
        loss: ``loss(logits, y) -> scalar`` to maximize; mean cross-entropy by default.
        bn_train: keep the model in train mode during the attack (the reference AT
            recipe); by default the attack runs in eval mode.
        backend: the seam backend for the step op (``None``: the default choice).
        check_range: raise a ``ValueError`` when ``x`` leaves [0, 1] (one host sync per call).
        awp: an :class:`awpfast.AWP` (or other awpfast wrapper): the last step also computes the
            gradient of ``loss`` at ``x^(K-1)`` w.r.t. its selected weights and hands it over as the
            ascent direction (see the module docstring); then call ``awp.perturb()`` without a closure.

    Call it as ``x_adv = attack(x, y)``: ``x`` in [0, 1]; the result stays in [0, 1] and
    within ``eps`` of ``x`` (for ``steps=0`` it is the starting point).
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 random_start: bool = True, norm: str = "Linf", loss: Optional[LossFn] = None,
                 bn_train: bool = False, backend: Optional[str] = None, check_range: bool = True, awp=None):
        if norm not in ("Linf", "L2"):
            raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
        _check_model("PGD", model)
        _check_sizes("PGD", eps, alpha, steps)
        self.awp = _check_awp("PGD", awp, steps)
        self.model = model
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.random_start, self.norm = bool(random_start), norm
        self.loss = loss if loss is not None else F.cross_entropy
        self.bn_train = bool(bn_train)
        self.backend = backend
        self.check_range = bool(check_range)

    def __repr__(self) -> str:
        return (f"PGD(eps={self.eps:.5g}, alpha={self.alpha:.5g}, steps={self.steps}, "
                f"random_start={self.random_start}, norm={self.norm!r}, bn_train={self.bn_train})")

    def init(self, x: torch.Tensor) -> torch.Tensor:
        """The starting point (a new tensor)."""
        if not self.random_start or self.eps == 0:
            return x.clamp(0.0, 1.0)
        if self.norm == "Linf":
            x_adv = x + torch.empty_like(x).uniform_(-self.eps, self.eps)
        else:
            b = x.shape[0]
            d = torch.empty_like(x).normal_()
            n = torch.linalg.vector_norm(d.reshape(b, -1), dim=1).view(-1, *([1] * (x.dim() - 1)))
            r = torch.zeros(b, dtype=x.dtype, device=x.device).uniform_(0, 1).view_as(n)
            x_adv = x + d * (r / n * self.eps)
        return x_adv.clamp_(0.0, 1.0)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward(x, y)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for the batch ``(x, y)`` (detached)."""
        _check_inputs(x, y, self.check_range)
        x = x.detach()
        x_adv = self.init(x)
        weights = _wanted("PGD", self.awp, self.steps)
        if self.steps == 0:
            return x_adv
        with attack_mode(self.model, self.bn_train), torch.enable_grad():
            for k in range(self.steps):
                x_adv.requires_grad_(True)
                loss = self.loss(self.model(x_adv), y)
                if weights is not None and k == self.steps - 1:
                    g = _input_and_weight_grad(loss, x_adv, self.awp, weights)
                else:
                    g = _input_grad(loss, x_adv)
                x_adv = x_adv.detach()
                ops.pgd_step_(x_adv, g.to(x_adv.dtype), x, self.alpha, self.eps, self.norm,
                              backend=self.backend)
        return x_adv.detach()


class TRADESAttack:
    """The TRADES inner maximization (Zhang et al. 2019): maximize
    ``KL(p(x) || p(x_adv))`` (summed over the batch, as the reference) from
    ``x + 0.001*N(0, 1)``, L-inf steps through the seam's PGD step op.

    ``y`` is accepted (and ignored) so that it is interchangeable with :class:`PGD`.

    ``l2_order`` (L2 only): ``"renorm-clamp"`` (default, the order of :class:`PGD` and of the
    seam's step op: step along ``g/(||g||+1e-10)``, rescale ``delta`` into the eps-ball, clamp
    to [0, 1]) or ``"clamp-renorm"``, the TRADES reference's order: step along ``g/||g||``
    (a zero gradient gives no step instead of the reference's NaN), clamp ``x + delta`` to
    [0, 1], then rescale ``delta`` into the eps-ball (``Tensor.renorm``, as the reference).
    The reference's own L2 step size is ``2 * eps / steps`` (its SGD learning rate on ``delta``).

    ``awp=``: as for :class:`PGD`; the weight gradient is that of the attack's own objective at the
    last iterate, ``sum_i KL(p(x_i) || p(x_i^(K-1)))`` with ``p(x)`` held fixed (computed without
    gradient), i.e. the gradient of the robust (KL) term of the TRADES loss only: neither the natural
    cross-entropy term nor the gradient through ``p(x)``, which the TRADES-AWP reference's ascent loss
    (the whole TRADES objective) includes.
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 random_start: bool = True, norm: str = "Linf", bn_train: bool = False,
                 backend: Optional[str] = None, check_range: bool = True, l2_order: str = "renorm-clamp",
                 awp=None):
        if norm not in ("Linf", "L2"):
            raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
        if l2_order not in L2_ORDERS:
            raise ValueError(f"l2_order must be one of {', '.join(L2_ORDERS)}, got {l2_order!r}")
        self.l2_order = l2_order
        _check_model("TRADESAttack", model)
        _check_sizes("TRADESAttack", eps, alpha, steps)
        self.awp = _check_awp("TRADESAttack", awp, steps)
        self.check_range = bool(check_range)
        self.model = model
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.random_start, self.norm = bool(random_start), norm
        self.bn_train = bool(bn_train)
        self.backend = backend

    def __repr__(self) -> str:
        extra = f", l2_order={self.l2_order!r}" if self.norm == "L2" else ""
        return (f"TRADESAttack(eps={self.eps:.5g}, alpha={self.alpha:.5g}, steps={self.steps}, "
                f"norm={self.norm!r}, bn_train={self.bn_train}{extra})")

    def __call__(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward(x, y)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Adversarial examples for ``x`` (detached); ``y`` is ignored."""
        _check_inputs(x, y, self.check_range)
        x = x.detach()
        weights = _wanted("TRADESAttack", self.awp, self.steps)
        with attack_mode(self.model, self.bn_train):
            with torch.no_grad():
                p_nat = F.softmax(_wide(self.model(x)), dim=1)
            x_adv = x + 0.001 * torch.randn_like(x) if self.random_start else x.clone()
            # (the reference does not clamp the start; the first step clamps to [0, 1])
            with torch.enable_grad():
                for k in range(self.steps):
                    x_adv.requires_grad_(True)
                    logp_adv = F.log_softmax(_wide(self.model(x_adv)), dim=1)
                    loss = F.kl_div(logp_adv, p_nat, reduction="sum")
                    if weights is not None and k == self.steps - 1:
                        g = _input_and_weight_grad(loss, x_adv, self.awp, weights)
                    else:
                        g = _input_grad(loss, x_adv)
                    x_adv = x_adv.detach()
                    if self.norm == "L2" and self.l2_order == "clamp-renorm":
                        x_adv = _l2_step_clamp_renorm(x_adv, g.to(x_adv.dtype), x, self.alpha, self.eps)
                    else:
                        ops.pgd_step_(x_adv, g.to(x_adv.dtype), x, self.alpha, self.eps, self.norm,
                                      backend=self.backend)
        if self.steps == 0:
            x_adv = x_adv.clamp(0.0, 1.0)
        return x_adv.detach()


def _l2_step_clamp_renorm(x_adv: torch.Tensor, g: torch.Tensor, x: torch.Tensor, alpha: float,
                          eps: float) -> torch.Tensor:
    """One L2 step in the TRADES reference's order (batched over samples, no per-sample loop):
    ``delta += alpha * g/||g||``, ``delta = clamp(x + delta, 0, 1) - x``, ``delta.renorm(eps)``."""
    b = x.shape[0]
    gn = torch.linalg.vector_norm(g.reshape(b, -1), dim=1).view(-1, *([1] * (x.dim() - 1)))
    step = torch.where(gn > 0, g / torch.where(gn > 0, gn, torch.ones_like(gn)), torch.zeros_like(g))
    delta = (x_adv - x) + alpha * step
    delta = (x + delta).clamp_(0.0, 1.0) - x
    delta = delta.renorm(p=2, dim=0, maxnorm=eps)
    return x + delta


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
    """Functional form: ``PGD(model, **kw)(x, y)``."""
    return PGD(model, **kw)(x, y)


def trades_attack(model: nn.Module, x: torch.Tensor, **kw) -> torch.Tensor:
    """Functional form: ``TRADESAttack(model, **kw)(x)``."""
    return TRADESAttack(model, **kw)(x)
