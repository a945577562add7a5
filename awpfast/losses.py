"""Adversarial-training objectives: AT (Madry), TRADES (Zhang et al.), MART (Wang et al.).

Each objective comes in two forms:

* ``*_from_logits(...)``: the formula on logits (what the tests check against the papers);
* an object ``loss(model, x, x_adv, y) -> scalar`` that runs the forwards it needs. The same
  object is the training loss *and* the AWP ascent loss::

      loss_fn = awpfast.losses.TRADESLoss(beta=6.0)
      awp.perturb(lambda: loss_fn(model, x, x_adv, y))   # ascent at w
      awp.zero_grad(); loss_fn(model, x, x_adv, y).backward(); awp.step()

  ``needs_clean`` says whether it runs a forward on the clean batch (TRADES, MART).

Formulas (B = batch size, p = softmax):

* AT: ``CE(f(x_adv), y)`` (mean).
* TRADES: ``CE(f(x), y) + beta/B * sum_i KL(p(x_i) || p(x_adv_i))`` (reference
  ``KLDivLoss(reduction='sum')(log p(x_adv), p(x)) / B``).
* MART: ``CE(f(x_adv), y) + NLL(log(1.0001 - p(x_adv) + 1e-12), y')``
  ``+ beta/B * sum_i KL(p(x_i) || p(x_adv_i))_i * (1.0000001 - p_y(x_i))`` where ``y'`` is
  the most likely wrong class under ``p(x_adv)``, and the KL term is the reference's
  ``KLDivLoss(reduction='none')(log(p(x_adv) + 1e-12), p(x))`` summed over classes.

Precision: the formulas keep the logits' dtype when it is float32 or wider (a float64 model
gets a float64 loss, as in the reference code) and compute in float32 when the logits are
half precision (float16 / bfloat16, e.g. under autocast); the result has that computing dtype.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "at_loss_from_logits", "trades_loss_from_logits", "mart_loss_from_logits",
    "ATLoss", "TRADESLoss", "MARTLoss", "get_loss", "METHODS", "FORWARD_ORDERS",
]

from .choices import FORWARD_ORDERS, METHODS  # noqa: E402  (the names, torch-free)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is float32 or wider, else ``t`` cast to float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def at_loss_from_logits(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy on the adversarial logits (float32 or wider, see the module docstring)."""
    return F.cross_entropy(_wide(logits_adv), y)


def trades_loss_from_logits(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                            beta: float = 6.0) -> torch.Tensor:
    """TRADES: ``CE(nat, y) + beta * KL(p(nat) || p(adv))`` (KL summed, divided by the batch)."""
    logits_nat, logits_adv = _wide(logits_nat), _wide(logits_adv)
    if logits_nat.dtype != logits_adv.dtype:
        logits_nat, logits_adv = logits_nat.double(), logits_adv.double()
    b = logits_nat.shape[0]
    natural = F.cross_entropy(logits_nat, y)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="sum") / b
    return natural + beta * robust


def mart_loss_from_logits(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                          beta: float = 6.0) -> torch.Tensor:
    """MART: boosted CE on adv + ``beta * KL * (1 - p_y(nat))`` (see the module docstring)."""
    logits_nat, logits_adv = _wide(logits_nat), _wide(logits_adv)
    if logits_nat.dtype != logits_adv.dtype:
        logits_nat, logits_adv = logits_nat.double(), logits_adv.double()
    b = logits_nat.shape[0]
    p_adv = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(p_adv, dim=1)[:, -2:]
    y_wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), y_wrong)
    p_nat = F.softmax(logits_nat, dim=1)
    p_true = p_nat.gather(1, y.unsqueeze(1)).squeeze(1)
    kl = F.kl_div(torch.log(p_adv + 1e-12), p_nat, reduction="none").sum(dim=1)
    robust = (kl * (1.0000001 - p_true)).sum() / b
    return loss_adv + beta * robust


class ATLoss:
    """Madry AT: cross-entropy on the adversarial batch. Its attack is PGD with CE."""
    needs_clean = False
    attack = "pgd"

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                 return_logits: bool = False):
        logits_adv = model(x_adv)
        loss = at_loss_from_logits(logits_adv, y)
        return (loss, logits_adv) if return_logits else loss

    def __repr__(self) -> str:
        return "ATLoss()"


class _PairLoss:
    """``order="ours"``: the forwards clean, then adversarial. ``order="reference"``: the BatchNorm
    feeding order of the TRADES-AWP reference script: adversarial, clean (the KL target), clean
    again (its cross-entropy). In train mode the second clean forward returns the same logits as
    the first, so it runs without gradient and only feeds BN's running statistics once more: the
    loss and its gradient are those of one clean forward, the statistics those of the reference.
    In eval mode (or with BN statistics frozen) the two orders give the same result."""
    needs_clean = True

    def __init__(self, beta: float = 6.0, order: str = "ours"):
        if order not in FORWARD_ORDERS:
            raise ValueError(f"order must be one of {', '.join(FORWARD_ORDERS)}, got {order!r}")
        self.beta = float(beta)
        self.order = order

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                 return_logits: bool = False):
        # One forward over the concatenated batch would mix BN statistics of clean and
        # adversarial inputs; the references run separate forwards, and so do we.
        if self.order == "reference":
            logits_adv = model(x_adv)
            logits_nat = model(x)
            if model.training:
                with torch.no_grad():
                    model(x)
        else:
            logits_nat = model(x)
            logits_adv = model(x_adv)
        loss = self._formula(logits_nat, logits_adv, y, self.beta)
        return (loss, logits_adv) if return_logits else loss

    def __repr__(self) -> str:
        extra = "" if self.order == "ours" else f", order={self.order!r}"
        return f"{type(self).__name__}(beta={self.beta}{extra})"


class TRADESLoss(_PairLoss):
    """TRADES: CE on clean + beta * KL(clean || adv). Its attack is the TRADES KL attack."""
    attack = "trades"
    _formula = staticmethod(trades_loss_from_logits)


class MARTLoss(_PairLoss):
    """MART: boosted CE on adv + beta * KL * (1 - p_y(clean)). Its attack is PGD with CE."""
    attack = "pgd"
    _formula = staticmethod(mart_loss_from_logits)


def get_loss(method: str, beta: float = 6.0, order: str = "ours"):
    """The loss object for ``--method at|trades|mart``; ``order``: the forward order of the
    two-forward losses (see :class:`TRADESLoss`; AT runs one forward either way)."""
    method = method.lower()
    if method == "at":
        return ATLoss()
    if method == "trades":
        return TRADESLoss(beta, order)
    if method == "mart":
        return MARTLoss(beta, order)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
