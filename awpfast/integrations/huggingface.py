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
epoch. The rule object is ``trainer.awp`` (built at the first training step).

Needs ``transformers`` (and ``accelerate``, which its Trainer requires); neither is an
awpfast dependency.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("awpfast.integrations.huggingface needs the transformers package: "
                      "pip install 'transformers[torch]'") from e

from ..optim import WeightPerturbation
from ..rules import AWP, SAM, BoxAWP

__all__ = ["AWPTrainerMixin", "AWPTrainer"]

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
        super().__init__(*args, **kwargs)

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
        rule = self._awp_build(model)
        prepared = self._prepare_inputs(inputs)
        model.train()

        def ascent_loss():
            with self.compute_loss_context_manager():
                return self.compute_loss(model, prepared, num_items_in_batch=num_items_in_batch)

        with rule.perturbed(ascent_loss):  # restores w exactly on exit, and on any exception
            return super().training_step(model, inputs, num_items_in_batch)


class AWPTrainer(AWPTrainerMixin, Trainer):
    """``transformers.Trainer`` with Box AWP / AWP / SAM in its training step. Extra keyword
    arguments: ``awp`` (``"box"``, ``"awp"``, ``"sam"`` or a factory), ``awp_kwargs``,
    ``awp_start_epoch``; the rule object is ``trainer.awp``."""
