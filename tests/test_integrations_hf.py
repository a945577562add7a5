"""The Hugging Face Trainer integration with a tiny randomly initialised BERT built from a
config (no download). Skipped where transformers / accelerate are not installed (CI)."""
import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra, not installed")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate, not installed")

from awpfast import AWP, SAM, BoxAWP  # noqa: E402
from awpfast.integrations.huggingface import AWPTrainer  # noqa: E402

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


def test_trainer_start_epoch_and_bad_rule(tmp_path):
    trainer = AWPTrainer(model=_model(), args=_args(tmp_path, max_steps=-1, num_train_epochs=1),
                         train_dataset=_dataset(8), awp="box", awp_start_epoch=1.0)
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

