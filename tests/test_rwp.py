"""RWP (Yu et al., IJCAI 2022) on the engine, against a straightforward re-implementation of the
reference's loop written here from its published code (``AT_AWP_RWP/utils_rwp.py``, read, not
copied): two proxy models loaded from the model's state each ascent iteration and moved by the
current scaled perturbation, the per-example cross-entropy masked by the Loss Stationary
Condition, a plain SGD step of lr 0.01 *up* that loss on one proxy, the weight change of the
``ndim > 1`` / ``"weight"`` tensors added to an accumulated difference, one global ratio
``||w|| / ||diff||``, then ``w + gamma * ratio * diff`` for the descent and ``- gamma * ratio *
diff`` after the optimizer's step. Float64, fresh random inputs; 2-process gloo checks in
``tests/test_rules_distributed.py``."""
import copy
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import awpfast
from awpfast import RWP

EPS = 1e-20
TOL = 1e-10


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def make(seed=0):
    torch.manual_seed(seed)
    return Net().double()


def batch(seed, n=12):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


# ----------------------------------------------------------------------------- the reference's loop, written out
class ReferenceRWP:
    def __init__(self, model, gamma, lr=0.01, iters=10):
        self.model, self.gamma, self.iters = model, gamma, iters
        self.proxy_1, self.proxy_2 = copy.deepcopy(model), copy.deepcopy(model)
        self.opt = torch.optim.SGD(self.proxy_2.parameters(), lr=lr)

    @staticmethod
    def _add(module, diff, coeff):
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name in diff:
                    p.add_(coeff * diff[name])

    def calc(self, x_adv, y, threshold):
        diff, diff_scale, kept = {}, {}, []
        for _ in range(self.iters):
            self.proxy_1.load_state_dict(self.model.state_dict())
            self.proxy_2.load_state_dict(self.model.state_dict())
            self._add(self.proxy_1, diff_scale, self.gamma)
            self._add(self.proxy_2, diff_scale, self.gamma)
            self.proxy_2.train()
            loss = F.cross_entropy(self.proxy_2(x_adv), y, reduction="none")
            indicator = (loss < threshold).to(loss.dtype)
            kept.append(int(indicator.sum()))
            loss = -(loss * indicator).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            old, new = self.proxy_1.state_dict(), self.proxy_2.state_dict()
            step = {k: new[k] - old[k] for k in old if old[k].dim() > 1 and "weight" in k}
            diff = step if not diff else {k: diff[k] + step[k] for k in diff}
            w = torch.cat([p.reshape(-1) for n, p in self.model.named_parameters() if n in diff])
            d = torch.cat([diff[k].reshape(-1) for k in diff])
            ratio = w.norm() / (d.norm() + EPS)
            diff_scale = {k: ratio * v for k, v in diff.items()}
        return diff_scale, kept

    def train_step(self, opt, x_adv, y, threshold):
        diff_scale, kept = self.calc(x_adv, y, threshold)
        self._add(self.model, diff_scale, self.gamma)
        self.model.train()
        loss = F.cross_entropy(self.model(x_adv), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        self._add(self.model, diff_scale, -self.gamma)
        return kept


def rwp_step(model, rwp, x_adv, y):
    rwp.perturb(lambda: F.cross_entropy(model(x_adv), y, reduction="none"))
    rwp.zero_grad()
    F.cross_entropy(model(x_adv), y).backward()
    rwp.step()


def _rel(a, b):
    return ((a - b).norm() / max(b.norm().item(), 1e-30)).item()


@pytest.mark.parametrize("threshold", [1.7, 1.55, 1e9], ids=["reference-c", "tighter", "all-kept"])
def test_rwp_equals_the_reference_loop_in_float64(threshold):
    for seed in range(2):  # fresh random inputs and weights
        ref_model, model = make(seed), make(seed)
        ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        ref = ReferenceRWP(ref_model, gamma=0.01)
        rwp = RWP(opt, model, gamma=0.01, loss_threshold=threshold)
        fractions = []
        for step in range(4):
            x, y = batch(100 * seed + step)
            kept = ref.train_step(ref_opt, x, y, threshold)
            rwp_step(model, rwp, x, y)
            fractions.append(rwp.last_kept_fraction)
            assert rwp.last_kept_fraction == pytest.approx(sum(kept) / (len(kept) * len(y)))
            for (n, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
                if a.is_floating_point():
                    assert _rel(a, b) < TOL, (step, n, _rel(a, b))
                else:
                    assert torch.equal(a, b), n
        if threshold == 1.7 and seed == 0:
            assert any(0 < f < 1 for f in fractions)  # the mask did mask something, not everything
        if threshold == 1e9:
            assert all(f == 1.0 for f in fractions)


def test_the_perturbation_has_the_global_size_and_grads_and_bn_stay():
    model = make(3)
    x, y = batch(7)
    F.cross_entropy(model(x), y).backward()  # the user's own gradients, to be left alone
    grads = [p.grad.clone() for p in model.parameters()]
    bn = {k: v.clone() for k, v in model.bn.state_dict().items()}
    w0 = [model.conv.weight.detach().clone(), model.fc.weight.detach().clone()]
    rwp = RWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.02)
    assert rwp.perturbed_parameters == ["conv.weight", "fc.weight"]
    assert rwp.perturb(lambda: F.cross_entropy(model(x), y, reduction="none"))
    v = torch.cat([(p.detach() - w).reshape(-1) for p, w in zip([model.conv.weight, model.fc.weight], w0)])
    w = torch.cat([t.reshape(-1) for t in w0])
    assert v.norm().item() == pytest.approx(0.02 * w.norm().item(), rel=1e-12)  # ONE norm over all layers
    per_layer = [(p.detach() - q).norm() / q.norm() for p, q in zip([model.conv.weight, model.fc.weight], w0)]
    assert abs(per_layer[0] - per_layer[1]) > 1e-6  # not AWP's per-layer rule
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(v, model.bn.state_dict()[k]) for k, v in bn.items())
    rwp.restore()
    assert all(torch.equal(p.detach(), q) for p, q in zip([model.conv.weight, model.fc.weight], w0))


def test_no_example_below_the_threshold_gives_a_zero_perturbation_said_once():
    model = make(1)
    x, y = batch(2)
    rwp = RWP(torch.optim.SGD(model.parameters(), lr=0.1), model, loss_threshold=0.0)
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="perturbation is zero") as rec:
        assert rwp.perturb(lambda: F.cross_entropy(model(x), y, reduction="none"))
    assert sum("perturbation is zero" in str(r.message) for r in rec) == 1
    assert rwp.last_kept_fraction == 0.0
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), w0))  # v = 0 exactly
    rwp.restore()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        rwp.perturb(lambda: F.cross_entropy(model(x), y, reduction="none"))
        rwp.restore()


def test_a_scalar_closure_is_refused_and_nothing_moves():
    model = make(0)
    x, y = batch(0)
    rwp = RWP(torch.optim.SGD(model.parameters(), lr=0.1), model)
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="per-example losses.*reduction='none'"):
        rwp.perturb(lambda: F.cross_entropy(model(x), y))
    assert not rwp.is_perturbed and all(torch.equal(p, q) for p, q in zip(model.parameters(), w0))
    with pytest.raises(TypeError, match="per-example adversarial losses"):
        rwp.perturb()
    with pytest.raises(TypeError, match="list"):
        rwp.accumulate(lambda: F.cross_entropy(model(x), y, reduction="none"))
    from awpfast.attacks import PGD
    with pytest.raises(ValueError, match="cannot source RWP"):
        PGD(model, eps=0.1, alpha=0.03, steps=1, awp=rwp)(x, y)
    for bad, msg in ((dict(steps=0), "steps must be an integer"), (dict(lr=0), "lr must be"),
                     (dict(gamma=2.0), "gamma must be"), (dict(loss_threshold=-1), "loss_threshold")):
        with pytest.raises(ValueError, match=msg):
            RWP(torch.optim.SGD(model.parameters(), lr=0.1), model, **bad)


def test_gamma_zero_is_a_warm_up_without_passes():
    model = make(0)
    calls = []
    rwp = RWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.0)
    x, y = batch(0)
    assert rwp.perturb(lambda: calls.append(1) or F.cross_entropy(model(x), y, reduction="none")) is False
    assert calls == []
    rwp.set_gamma(0.01)
    assert rwp.perturb(lambda: calls.append(1) or F.cross_entropy(model(x), y, reduction="none"))
    assert len(calls) == 10


def test_state_dict_round_trip_resumes_exactly():
    def build():
        m = make(5)
        return m, RWP(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m, gamma=0.01, steps=3)
    m1, r1 = build()
    for s in range(5):
        rwp_step(m1, r1, *batch(40 + s))
    m2, r2 = build()
    for s in range(2):
        rwp_step(m2, r2, *batch(40 + s))
    sd, msd = copy.deepcopy(r2.state_dict()), copy.deepcopy(m2.state_dict())
    assert sd["awpfast"]["rule"] == "RWP" and sd["awpfast"]["loss_threshold"] == 1.7
    m3, r3 = build()
    m3.load_state_dict(msd)
    r3.load_state_dict(sd)
    for s in range(2, 5):
        rwp_step(m3, r3, *batch(40 + s))
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m3.state_dict().values()))
    m4, r4 = build()
    with pytest.warns(UserWarning, match="loss_threshold=1.7"):
        RWP(r4.optimizer, m4, steps=3, loss_threshold=1.0).load_state_dict(sd)


# ----------------------------------------------------------------------------- CLI
CLI = ["--data", "synthetic", "--image-size", "8", "--model", "small-cnn", "--width", "4", "--batch-size", "32",
       "--attack-steps", "2", "--eval-steps", "1", "--eval-samples", "32", "--train-eval-samples", "32",
       "--train-samples", "96", "--val-samples", "32", "--epochs", "2", "--seed", "3", "--no-progress", "--quiet",
       "--no-plot", "--threads", "1", "--awp-rule", "rwp", "--rwp-steps", "3"]


def test_cli_rwp_runs_records_and_resumes_bit_exactly(tmp_path):
    from awpfast import train as T
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert T.main(CLI + ["--out", full]) == 0
    assert T.main(CLI + ["--out", part, "--stop-after", "1"]) == 0
    assert T.main(["--resume", os.path.join(part, "last.pt"), "--no-progress", "--quiet"]) == 0
    rec = json.load(open(os.path.join(full, "args.json")))
    assert rec["awp_rule"] == "rwp" and rec["rwp_steps"] == 3 and rec["rwp_threshold"] == 1.7
    a = torch.load(os.path.join(full, "last.pt"), weights_only=False)
    b = torch.load(os.path.join(part, "last.pt"), weights_only=False)
    assert a["optimizer"]["awpfast"]["rule"] == "RWP" and a["optimizer"]["awpfast"]["perturb_count"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_cli_rwp_recipe_and_checks(tmp_path, capsys):
    from awpfast import train as T
    from awpfast.train.recipes import RECIPES
    r = RECIPES["at-rwp-reference"]
    assert (r["awp_rule"], r["awp_gamma"], r["rwp_steps"], r["rwp_lr"], r["rwp_threshold"]) == ("rwp", 0.01, 10, 0.01,
                                                                                                1.7)
    assert T.main(CLI + ["--awp-ascent", "attack", "--out", str(tmp_path / "a")]) == 2
    assert "--awp-rule rwp" in capsys.readouterr().err
    assert T.main(CLI + ["--rwp-steps", "0", "--out", str(tmp_path / "b")]) == 2
    assert "--rwp-steps must be an integer >= 1" in capsys.readouterr().err
