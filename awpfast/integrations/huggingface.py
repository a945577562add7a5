"""Hugging Face ``transformers`` Trainer with weight perturbation (Box AWP, AWP, SAM).

    from awpfast.integrations.huggingface import AWPTrainer

    trainer = AWPTrainer(model=model, args=args, train_dataset=ds,
                         awp="box", awp_kwargs=dict(adv_lr=1.0, adv_eps=0.2), awp_start_epoch=1.0)
    trainer.train()

Each micro-batch's training step becomes: the ascent direction from the batch's loss at ``w``
(taken with ``torch.autograd.grad``: ``.grad`` and the accumulated gradients are untouched),
``w <- w + v`` by the rule, the Trainer's own forward + backward at ``w + v`` (loss scaling,
gradient accumulation, DDP gradient sync unchanged), then ``w`` restored exactly. The
Trainer's optimizer step therefore sees ``w`` and the gradient at the perturbed weights, as in
the competition notebooks (clean backward, perturb, ``zero_grad``, adversarial backward,
restore, step) and in SAM: two forward + backward passes per micro-batch.

``awp``: ``"box"`` (:class:`awpfast.BoxAWP`), ``"awp"`` (:class:`awpfast.AWP`), ``"sam"``
(:class:`awpfast.SAM`) or a callable ``(optimizer, model) -> WeightPerturbation``;
``awp_kwargs`` go to the class. ``awp_start_epoch``: plain training before this (fractional)
epoch, compared with the Trainer's ``state.epoch`` (``k / updates_per_epoch`` during optimizer
update ``k``, 0-based); a run of one epoch with ``awp_start_epoch=1.0`` therefore never
perturbs. At ``train()`` a ``UserWarning`` says so when AWP will not switch on within
``num_train_epochs`` / ``max_steps``; the step where it switches on is logged once (logger
``awpfast.integrations.huggingface``, level INFO). The rule object is ``trainer.awp`` (built at
the first perturbed step).

Needs ``transformers`` (and ``accelerate``, which its Trainer requires); neither is an
awpfast dependency. Without them ``AWPTrainerMixin`` and :func:`awp_first_update` still import;
``AWPTrainer`` raises the ImportError.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable, Optional, Union

try:
    from transformers import Trainer
except ImportError as e:  # exercised without transformers: the mixin and the schedule still import
    Trainer, _MISSING = None, e

from ..optim import WeightPerturbation
from ..rules import AWP, SAM, BoxAWP

__all__ = ["AWPTrainerMixin", "AWPTrainer", "awp_first_update", "updates_per_epoch"]

logger = logging.getLogger(__name__)


def updates_per_epoch(num_examples: int, batch_size: int, grad_accum: int = 1, world_size: int = 1,
                      drop_last: bool = False) -> int:
    """Optimizer updates per epoch as the Trainer counts them: micro-batches of ``batch_size`` per
    process (``num_examples`` split over ``world_size``), ``grad_accum`` of them per update, at
    least 1."""
    per_rank = math.ceil(num_examples / max(world_size, 1))
    batches = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
    return max(batches // max(grad_accum, 1), 1)


def awp_first_update(start_epoch: float, per_epoch: int, num_train_epochs: float = 1.0,
                     max_steps: int = -1) -> Optional[int]:
    """The first optimizer update (0-based) whose micro-batches are perturbed, or None when AWP
    never switches on within the run. The Trainer's ``state.epoch`` during update ``k`` is
    ``k / per_epoch``; the run has ``max_steps`` updates when ``max_steps > 0`` (the Trainer's
    rule), else ``ceil(num_train_epochs * per_epoch)``."""
    total = max_steps if max_steps and max_steps > 0 else math.ceil(num_train_epochs * per_epoch)
    first = max(math.ceil(start_epoch * per_epoch - 1e-9), 0)
    return first if first < total else None

_RULES = {"box": BoxAWP, "awp": AWP, "sam": SAM}


class AWPTrainerMixin:
    """Adds weight perturbation to a ``transformers.Trainer`` (sub)class: combine it first,
    e.g. ``class MyTrainer(AWPTrainerMixin, SomeTrainer): ...``. See the module docstring."""

    def __init__(self, *args, awp: Union[str, Callable[..., WeightPerturbation]] = "box",
                 awp_kwargs: Optional[dict] = None, awp_start_epoch: float = 0.0, **kwargs):
        if isinstance(awp, str):
            if awp not in _RULES:
                raise ValueError(f"awp must be one of {sorted(_RULES)} or a callable (optimizer, model) -> "
                                 f"WeightPerturbation, got {awp!r}")
        elif not callable(awp):
            raise TypeError(f"awp must be a rule name or a callable, got {type(awp).__name__}")
        if not (isinstance(awp_start_epoch, (int, float)) and awp_start_epoch >= 0):
            raise ValueError(f"awp_start_epoch must be a number >= 0, got {awp_start_epoch!r}")
        self.awp_rule, self.awp_kwargs = awp, dict(awp_kwargs or {})
        self.awp_start_epoch = float(awp_start_epoch)
        self.awp: Optional[WeightPerturbation] = None
        self._awp_key = None
        self._awp_announced = False
        super().__init__(*args, **kwargs)

    def awp_schedule(self) -> Optional[tuple]:
        """``(first_update, total_updates, per_epoch)`` from the training arguments and the length
        of ``train_dataset``; None when the dataset has no length (the run's length is unknown)."""
        ds, a = getattr(self, "train_dataset", None), self.args
        try:
            n = len(ds)
        except TypeError:
            return None
        per = updates_per_epoch(n, a.per_device_train_batch_size * max(getattr(a, "n_gpu", 1), 1),
                                a.gradient_accumulation_steps, getattr(a, "world_size", 1),
                                getattr(a, "dataloader_drop_last", False))
        total = a.max_steps if a.max_steps and a.max_steps > 0 else math.ceil(a.num_train_epochs * per)
        return awp_first_update(self.awp_start_epoch, per, a.num_train_epochs, a.max_steps), total, per

    def train(self, *args, **kwargs):
        """The Trainer's ``train()``; first warns when ``awp_start_epoch`` lies beyond the run."""
        self._awp_announced = False
        sched = self.awp_schedule() if self.awp_start_epoch > 0 else None
        if sched is not None and sched[0] is None:
            warnings.warn(
                f"AWPTrainer: awp_start_epoch={self.awp_start_epoch:g} is never reached in this run "
                f"({sched[1]} optimizer updates, {sched[2]} per epoch: the last one runs at epoch "
                f"{(sched[1] - 1) / sched[2]:.3g}), so it trains with no weight perturbation at all. Lower "
                "awp_start_epoch (0 perturbs from the first step) or train longer.", UserWarning, stacklevel=2)
        return super().train(*args, **kwargs)

    def _awp_build(self, model):
        base = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's AcceleratedOptimizer
        key = (id(base), id(model))
        if self.awp is None or key != self._awp_key:
            if callable(self.awp_rule):
                self.awp = self.awp_rule(base, model, **self.awp_kwargs)
            else:
                kw = dict(self.awp_kwargs)
                if self.awp_rule == "awp":
                    kw.setdefault("restore", "before_step")  # w is restored right after the backward
                self.awp = _RULES[self.awp_rule](base, model, **kw)
            if not isinstance(self.awp, WeightPerturbation):
                raise TypeError(f"the awp factory returned {type(self.awp).__name__}, not a WeightPerturbation")
            self._awp_key = key
        return self.awp

    def awp_active(self) -> bool:
        """Whether this training step perturbs (``awp_start_epoch`` reached)."""
        epoch = self.state.epoch or 0.0
        return epoch >= self.awp_start_epoch

    def training_step(self, model, inputs: dict, num_items_in_batch: Any = None):
        """The Trainer's training step at ``w + v``, with ``w`` restored exactly afterwards."""
        if not self.awp_active():
            return super().training_step(model, inputs, num_items_in_batch)
        if not self._awp_announced:
            self._awp_announced = True
            logger.info("AWPTrainer: weight perturbation (%s) on from epoch %.4g (global step %s; "
                        "awp_start_epoch=%g)", self.awp_rule if isinstance(self.awp_rule, str) else "factory",
                        self.state.epoch or 0.0, getattr(self.state, "global_step", "?"), self.awp_start_epoch)
        rule = self._awp_build(model)
        prepared = self._prepare_inputs(inputs)
        model.train()

        def ascent_loss():
            with self.compute_loss_context_manager():
                return self.compute_loss(model, prepared, num_items_in_batch=num_items_in_batch)

        with rule.perturbed(ascent_loss):  # restores w exactly on exit, and on any exception
            return super().training_step(model, inputs, num_items_in_batch)


if Trainer is not None:
    class AWPTrainer(AWPTrainerMixin, Trainer):
        """``transformers.Trainer`` with Box AWP / AWP / SAM in its training step. Extra keyword
        arguments: ``awp`` (``"box"``, ``"awp"``, ``"sam"`` or a factory), ``awp_kwargs``,
        ``awp_start_epoch``; the rule object is ``trainer.awp``."""
else:
    def __getattr__(name: str):
        if name == "AWPTrainer":
            raise ImportError("awpfast.integrations.huggingface.AWPTrainer needs the transformers package: "
                              "pip install 'transformers[torch]' accelerate") from _MISSING
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
