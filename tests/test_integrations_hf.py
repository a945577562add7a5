"""The Hugging Face Trainer integration with a tiny randomly initialised BERT built from a
config (no download), skipped where transformers / accelerate are not installed (CI); the
awp_start_epoch schedule and its warning/log run everywhere, through AWPTrainerMixin on a fake
Trainer."""
import copy
import logging
import math
import types
import warnings

import pytest
import torch
import torch.nn as nn

try:
    import accelerate  # noqa: F401
    import transformers
    HAVE_HF = True
except ImportError:
    transformers, HAVE_HF = None, False

from awpfast import AWP, SAM, BoxAWP  # noqa: E402
from awpfast.integrations.huggingface import AWPTrainerMixin, awp_first_update, updates_per_epoch  # noqa: E402

needs_hf = pytest.mark.skipif(not HAVE_HF, reason="transformers + accelerate are optional extras, not installed")


# ------------------------------------------------------------------ the schedule (no transformers)
def test_awp_first_update_schedule():
    assert awp_first_update(1.0, 4, num_train_epochs=1) is None      # the docs' 1.0 on a 1-epoch run: never
    assert awp_first_update(1.0, 4, num_train_epochs=2) == 4         # epoch 1 starts at update 4
    assert awp_first_update(1.0, 4, max_steps=5) == 4                # max_steps overrides the epochs
    assert awp_first_update(1.0, 4, max_steps=4) is None
    assert awp_first_update(0.0, 4) == 0 and awp_first_update(0.5, 3) == 2
    assert awp_first_update(0.9, 10, num_train_epochs=1) == 9        # the last update of the epoch
    assert updates_per_epoch(16, 4) == 4 and updates_per_epoch(16, 4, grad_accum=2) == 2
    assert updates_per_epoch(18, 4) == 5 and updates_per_epoch(18, 4, drop_last=True) == 4
    assert updates_per_epoch(16, 4, world_size=2) == 2 and updates_per_epoch(3, 8, grad_accum=4) == 1


class _FakeTrainer:
    """The parts of transformers.Trainer the mixin uses; ``train()`` updates ``state.epoch`` after
    every optimizer update the way the Trainer does."""

    def __init__(self, model=None, args=None, train_dataset=None):
        self.model, self.args, self.train_dataset = model, args, train_dataset
        self.state = types.SimpleNamespace(epoch=None, global_step=0)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        self.perturbed = []

    def _prepare_inputs(self, inputs):
        return inputs

    def compute_loss_context_manager(self):
        import contextlib
        return contextlib.nullcontext()

    def compute_loss(self, model, inputs, num_items_in_batch=None):
        return ((model(inputs["x"]) - inputs["y"]) ** 2).mean()

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.perturbed.append(self.awp is not None and self.awp.is_perturbed)
        loss = self.compute_loss(model, inputs)
        loss.backward()
        return loss.detach()

    def train(self):
        a = self.args
        per = updates_per_epoch(len(self.train_dataset), a.per_device_train_batch_size, a.gradient_accumulation_steps)
        total = a.max_steps if a.max_steps > 0 else math.ceil(a.num_train_epochs * per)
        for k in range(total):
            for _ in range(a.gradient_accumulation_steps):
                self.training_step(self.model, self.train_dataset[0])
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.state.global_step = k + 1
            self.state.epoch = (k + 1) / per


class _MixinTrainer(AWPTrainerMixin, _FakeTrainer):
    pass


def _fake(epochs, start, max_steps=-1, n=16):
    torch.manual_seed(0)
    args = types.SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=1, num_train_epochs=epochs,
                                 max_steps=max_steps, world_size=1, n_gpu=1, dataloader_drop_last=False)
    data = [{"x": torch.randn(4, 3), "y": torch.randn(4, 2)}] * n
    return _MixinTrainer(model=nn.Linear(3, 2), args=args, train_dataset=data, awp="awp",
                         awp_kwargs=dict(gamma=0.01), awp_start_epoch=start)


def test_trainer_warns_when_awp_never_switches_on(caplog):
    t = _fake(epochs=1, start=1.0)
    with pytest.warns(UserWarning, match=r"awp_start_epoch=1 is never reached .*4 optimizer updates, 4 per epoch"):
        t.train()
    assert t.awp is None and t.perturbed == [False] * 4


def test_trainer_logs_once_when_awp_switches_on(caplog):
    t = _fake(epochs=2, start=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reached within the run: no warning
        with caplog.at_level(logging.INFO, logger="awpfast.integrations.huggingface"):
            t.train()
    on = [r.getMessage() for r in caplog.records if "weight perturbation" in r.getMessage()]
    assert len(on) == 1 and "on from epoch 1 (global step 4" in on[0], on
    assert t.perturbed == [False] * 4 + [True] * 4 and isinstance(t.awp, AWP)
    t2 = _fake(epochs=1, start=0.5, max_steps=3)   # max_steps: 3 updates, AWP from update 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t2.train()
    assert t2.perturbed == [False, False, True]


def test_awptrainer_without_transformers_names_the_package():
    if HAVE_HF:
        pytest.skip("transformers is installed")
    with pytest.raises(ImportError, match="needs the transformers package"):
        from awpfast.integrations.huggingface import AWPTrainer  # noqa: F401


# ------------------------------------------------------------------ the real Trainer
if HAVE_HF:
    from awpfast.integrations.huggingface import AWPTrainer
else:
    AWPTrainer = object

VOCAB, LABELS, SEQ = 40, 3, 9


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, num_labels=LABELS,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def _dataset(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = torch.randint(0, LABELS, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", max_grad_norm=0.0,
                lr_scheduler_type="constant", seed=0, remove_unused_columns=False, disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


class Recorder(AWPTrainer):
    """Records, per optimizer step, the weights at the start of the step, the batch, and the
    weights and gradients the optimizer step sees."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.rec = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.rec.append({"w": {n: p.detach().clone() for n, p in model.named_parameters()},
                         "batch": {k: v.clone() for k, v in inputs.items()}})
        return super().training_step(model, inputs, num_items_in_batch)

    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        rec = self.rec

        def hook(o, args, kwargs):
            m = self.model
            rec[-1]["at_step"] = {n: p.detach().clone() for n, p in m.named_parameters()}
            rec[-1]["grads"] = {n: None if p.grad is None else p.grad.detach().clone() for n, p in m.named_parameters()}
        opt.register_step_pre_hook(hook)
        return opt


def _box_expected_grads(model, w, batch, adv_lr, adv_eps):
    """The notebook's step from ``w``: clean gradient, per-tensor box step on 'weight' tensors,
    gradient at the perturbed weights."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(w[n])
    m.zero_grad()
    m(**batch).loss.backward()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "weight" not in n or p.grad is None:
                continue
            g, w0 = p.grad, w[n]
            gn = g.norm()
            if gn == 0 or not torch.isfinite(gn):
                continue
            new = p + adv_lr * g / (gn + 1e-6) * (p.norm() + 1e-6)
            p.copy_(torch.min(torch.max(new, w0 - adv_eps * w0.abs()), w0 + adv_eps * w0.abs()))
    m.zero_grad()
    m(**batch).loss.backward()
    return {n: p.grad for n, p in m.named_parameters()}


@needs_hf
def test_box_awp_trainer_steps_at_w_with_the_perturbed_gradient(tmp_path):
    model = _model()
    trainer = Recorder(model=model, args=_args(tmp_path), train_dataset=_dataset(),
                       awp="box", awp_kwargs=dict(adv_lr=0.5, adv_eps=0.05))
    trainer.train()
    assert isinstance(trainer.awp, BoxAWP) and trainer.awp.perturb_count == 2
    assert len(trainer.rec) == 2
    ref = _model()
    for r in trainer.rec:
        # the optimizer step sees w exactly (restored bit for bit after the backward at w + v)
        assert all(torch.equal(r["at_step"][n], r["w"][n]) for n in r["w"])
        expected = _box_expected_grads(ref, r["w"], r["batch"], 0.5, 0.05)
        clean = copy.deepcopy(ref)
        with torch.no_grad():
            for n, p in clean.named_parameters():
                p.copy_(r["w"][n])
        clean(**r["batch"]).loss.backward()
        moved = 0.0
        for n, g in r["grads"].items():
            e = expected[n]
            assert g is not None and torch.isfinite(g).all(), n
            assert (g - e).norm() <= 1e-4 * e.norm() + 1e-7, (n, float((g - e).norm()), float(e.norm()))
            moved = max(moved, float((g - dict(clean.named_parameters())[n].grad).norm() / e.norm()))
        assert moved > 1e-2, "the step's gradient must differ from the clean one (the weights were perturbed)"


@needs_hf
@pytest.mark.parametrize("rule,cls", [("sam", SAM), ("awp", AWP)])
def test_sam_and_awp_trainer_with_gradient_accumulation(tmp_path, rule, cls):
    model = _model(3)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    kw = dict(rho=0.05) if rule == "sam" else dict(gamma=0.01)
    trainer = AWPTrainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2, max_steps=2),
                         train_dataset=_dataset(), awp=rule, awp_kwargs=kw)
    out = trainer.train()
    assert isinstance(trainer.awp, cls) and trainer.awp.perturb_count == 4   # one per micro-batch
    assert not trainer.awp.is_perturbed and math.isfinite(out.training_loss)
    assert any(not torch.equal(p, w0[n]) for n, p in model.named_parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@needs_hf
def test_trainer_start_epoch_and_bad_rule(tmp_path):
    trainer = AWPTrainer(model=_model(), args=_args(tmp_path, max_steps=-1, num_train_epochs=1),
                         train_dataset=_dataset(8), awp="box", awp_start_epoch=1.0)
    with pytest.warns(UserWarning, match="is never reached"):
        trainer.train()
    assert trainer.awp is None  # never switched on within the first epoch
    with pytest.raises(ValueError, match="awp must be one of"):
        AWPTrainer(model=_model(), args=_args(tmp_path), train_dataset=_dataset(), awp="fgm")
    made = []

    def factory(opt, model):
        made.append(1)
        return BoxAWP(opt, model, adv_lr=0.1, include=lambda n, p: "classifier" in n)
    trainer = AWPTrainer(model=_model(), args=_args(tmp_path, max_steps=1), train_dataset=_dataset(), awp=factory)
    trainer.train()
    assert made == [1] and trainer.awp.perturbed_parameters == ["classifier.weight", "classifier.bias"]

