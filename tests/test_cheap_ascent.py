"""The cheap AWP ascents: the attack-sourced direction (``PGD(..., awp=awp)``,
``TRADESAttack(..., awp=awp)``) and ``AWP(..., ascent_every=K)``; their CLI options
(``--awp-ascent attack``, ``--awp-every K``). Numerics in float64 against an independent
reference on fresh random inputs; 2-process gloo checks in ``_cheap_worker.py``."""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from awpfast import AWP
from awpfast.attacks import PGD, TRADESAttack
from _dist_launch import launch


class Net(nn.Module):
    def __init__(self, bn=True):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def make(seed=0, bn=True, dtype=torch.float64):
    torch.manual_seed(seed)
    return Net(bn).to(dtype)


def batch(seed, n=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, 6, 6, generator=g, dtype=dtype), torch.randint(0, 5, (n,), generator=g)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


ATTACKS = {
    "pgd-linf": lambda m, **kw: PGD(m, eps=0.1, alpha=0.03, steps=3, **kw),
    "pgd-l2": lambda m, **kw: PGD(m, eps=0.5, alpha=0.2, steps=3, norm="L2", **kw),
    "trades": lambda m, **kw: TRADESAttack(m, eps=0.1, alpha=0.03, steps=3, **kw),
}


def _reference_direction(name, model, x, y, bn_train):
    """The float64 gradient at x^(K-1), computed independently: x^(K-1) from the same attack with
    K-1 steps (same random start), the loss re-built by hand, plain autograd on a copy."""
    ref = copy.deepcopy(model)
    torch.manual_seed(7)
    x_prev = ATTACKS[name](ref, bn_train=bn_train)
    x_prev.steps -= 1
    x_prev = x_prev(x, y)
    ref.train(bn_train)
    weights = [ref.conv.weight, ref.fc.weight]
    if name == "trades":
        with torch.no_grad():
            p_nat = F.softmax(ref(x), dim=1)
        loss = F.kl_div(F.log_softmax(ref(x_prev), dim=1), p_nat, reduction="sum")
    else:
        loss = F.cross_entropy(ref(x_prev), y)
    return torch.autograd.grad(loss, weights)


@pytest.mark.parametrize("bn_train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_direction_is_the_gradient_at_the_last_iterate(name, bn_train):
    for seed in range(3):  # fresh random inputs and weights
        model = make(seed)
        x, y = batch(100 + seed)
        with torch.no_grad():
            model.bn.running_mean.normal_()
            model.bn.running_var.uniform_(0.5, 2)
        want = _reference_direction(name, model, x, y, bn_train)
        awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.01)
        torch.manual_seed(7)
        ATTACKS[name](model, bn_train=bn_train, awp=awp)(x, y)
        got = awp._ascent.pending
        assert got is not None and len(got) == 2
        for g, w in zip(got, want):
            assert rel(g, w.reshape(-1)) < 1e-10


@pytest.mark.parametrize("bn_train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_x_adv_bn_and_grad_as_without_awp(name, bn_train):
    """x_adv bit-identical, BatchNorm statistics as the plain attack leaves them, no .grad."""
    m1, m2 = make(3), make(3)
    x, y = batch(5)
    torch.manual_seed(1)
    a = ATTACKS[name](m1, bn_train=bn_train)(x, y)
    awp = AWP(torch.optim.SGD(m2.parameters(), lr=0.1), m2, gamma=0.01)
    torch.manual_seed(1)
    b = ATTACKS[name](m2, bn_train=bn_train, awp=awp)(x, y)
    assert torch.equal(a, b)
    for k, v in m1.bn.state_dict().items():
        assert torch.equal(v, m2.bn.state_dict()[k]), k
    assert all(p.grad is None for p in m2.parameters())
    assert awp._ascent.pending is not None


class Counting(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


@pytest.mark.parametrize("source", ["separate", "attack"])
def test_forward_count(source):
    """One AT-AWP step with PGD-K: K+2 model forwards with a separate ascent, K+1 attack-sourced."""
    model = make(0)
    counted = Counting(model)
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.01)
    x, y = batch(1)
    k = 4
    attack = PGD(counted, eps=0.1, alpha=0.03, steps=k, awp=awp if source == "attack" else None)
    x_adv = attack(x, y)
    closure = None if source == "attack" else (lambda: F.cross_entropy(counted(x_adv), y))
    assert awp.perturb(closure)
    awp.zero_grad()
    F.cross_entropy(counted(x_adv), y).backward()
    awp.step()
    assert counted.calls == (k + 1 if source == "attack" else k + 2)


def test_attack_sourced_perturbation_is_the_awp_rule():
    """perturb() applies v_l = gamma ||w_l|| g_l / ||g_l|| with g the attack's direction."""
    model = make(2)
    x, y = batch(9)
    want_g = _reference_direction("pgd-linf", model, x, y, False)
    w0 = [model.conv.weight.detach().clone(), model.fc.weight.detach().clone()]
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.02)
    torch.manual_seed(7)
    ATTACKS["pgd-linf"](model, awp=awp)(x, y)
    assert awp.perturb()
    for p, w, g in zip([model.conv.weight, model.fc.weight], w0, want_g):
        assert rel(p.detach(), w + 0.02 * w.norm() * g / g.norm()) < 1e-12
    awp.restore()


def test_attack_gamma_zero_computes_nothing_and_ascent_every_skips():
    model = make(0)
    x, y = batch(2)
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.0, ascent_every=2)
    attack = PGD(model, eps=0.1, alpha=0.03, steps=2, awp=awp)
    attack(x, y)
    assert awp._ascent.pending is None
    with awp.perturbed(None) as a:  # nothing to apply at gamma 0: no error, not perturbed
        assert not a.is_perturbed
    awp.set_gamma(0.01)
    wanted = []
    for s in range(5):
        attack(x, y)
        wanted.append(awp._ascent.pending is not None)
        assert awp.perturb()
        awp.step()
    assert wanted == [True, False, True, False, True]


def test_attack_awp_errors():
    model = make(0)
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model)
    x, y = batch(0)
    with pytest.raises(ValueError, match="steps >= 1"):
        PGD(model, steps=0, awp=awp)
    with pytest.raises(ValueError, match="steps >= 1"):
        TRADESAttack(model, steps=0, awp=awp)
    a = PGD(model, steps=1, awp=awp)
    a.steps = 0
    with pytest.raises(ValueError, match="steps >= 1"):
        a(x, y)
    with pytest.raises(TypeError, match="awpfast.AWP"):
        PGD(model, awp=torch.optim.SGD(model.parameters(), lr=0.1))
    other = make(1)
    with pytest.raises(ValueError, match="not connected"):
        PGD(other, eps=0.1, alpha=0.03, steps=1, awp=awp)(x, y)
    awp._setting.sharded = True  # as under FSDP2 (the real case runs in the 2-process test)
    try:
        with pytest.raises(ValueError, match="FSDP2.*perturb\\(closure\\).*ascent_every"):
            PGD(model, eps=0.1, alpha=0.03, steps=1, awp=awp)(x, y)
    finally:
        awp._setting.sharded = False
    eps0 = PGD(model, eps=0.0, alpha=0.03, steps=1, awp=awp)  # eps 0: the gradient at the clean input
    assert torch.equal(eps0(x, y), x)
    ref = copy.deepcopy(model).eval()
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), [ref.conv.weight])[0]
    assert rel(awp._ascent.pending[0], g.reshape(-1)) < 1e-12


def test_sum_reduction_gives_the_same_perturbation():
    """The loss's reduction only scales the direction: the same weights after perturb()."""
    x, y = batch(4)
    out = []
    for red in ("mean", "sum"):
        model = make(5)
        awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.01)
        PGD(model, eps=0.1, alpha=0.03, steps=2, random_start=False, awp=awp,
            loss=lambda z, t, red=red: F.cross_entropy(z, t, reduction=red))(x, y)
        awp.perturb()
        out.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*out):
        assert (a - b).abs().max() <= 1e-13 * (1 + b.abs().max())


# ----------------------------------------------------------------------------- ascent_every
def _train(model, awp, steps, start=0, calls=None):
    for s in range(start, start + steps):
        x, y = batch(50 + s)

        def closure():
            if calls is not None:
                calls.append(s)
            return F.cross_entropy(model(x), y)
        awp.perturb(closure)
        awp.zero_grad()
        F.cross_entropy(model(x), y).backward()
        awp.step()


def test_ascent_every_calls_the_closure_on_the_expected_steps():
    model = make(0)
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, gamma=0.0, ascent_every=3)
    calls = []
    _train(model, awp, 2, calls=calls)          # gamma 0 (a warm-up): no pass, the clock does not run
    awp.set_gamma(0.01)
    _train(model, awp, 8, start=2, calls=calls)
    assert calls == [2, 5, 8]


def test_ascent_every_one_is_todays_awp_bit_for_bit():
    m1, m2 = make(0), make(0)
    a1 = AWP(torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9), m1, gamma=0.01)
    a2 = AWP(torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), m2, gamma=0.01, ascent_every=1)
    _train(m1, a1, 3)
    _train(m2, a2, 3)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert a1.state_dict()["awpfast"] == a2.state_dict()["awpfast"]
    assert "direction" not in a2.state_dict()["awpfast"]


def test_ascent_every_reuses_the_stored_direction_rescaled():
    """A re-use step calls no closure and perturbs by gamma ||w_l|| d_l / ||d_l|| at the current weights."""
    model = make(1)
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, gamma=0.01, ascent_every=2)
    x, y = batch(3)
    _train(model, awp, 1)  # step 0 computes and stores the direction
    w = [model.conv.weight.detach().clone(), model.fc.weight.detach().clone()]
    stored = [d.clone() for d in awp._ascent.stored]
    called = []
    assert awp.perturb(lambda: called.append(1) or F.cross_entropy(model(x), y))
    assert called == []
    for p, w0, d in zip([model.conv.weight, model.fc.weight], w, stored):
        d = d.reshape(w0.shape)
        assert rel(p.detach(), w0 + 0.01 * w0.norm() * d / d.norm()) < 1e-12
    awp.restore()


def test_ascent_every_state_dict_round_trip_resumes_exactly():
    def build(seed=0):
        m = make(seed)
        return m, AWP(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), m,
                      gamma=0.01, ascent_every=3)
    m1, a1 = build()
    _train(m1, a1, 7)
    m2, a2 = build()
    _train(m2, a2, 2)   # the direction of step 0 stored, step 1 re-used it; step 2 re-uses it too
    sd = copy.deepcopy(a2.state_dict())
    msd = copy.deepcopy(m2.state_dict())
    m3, a3 = build(seed=9)
    m3.load_state_dict(msd)
    a3.load_state_dict(sd)
    calls = []
    _train(m3, a3, 5, start=2, calls=calls)
    assert calls == [3, 6]
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters()))
    assert torch.equal(torch.cat([d for d in a1._ascent.stored]), torch.cat([d for d in a3._ascent.stored]))


def test_ascent_every_errors():
    m = make(0)
    with pytest.raises(ValueError, match="steps=1"):
        AWP(torch.optim.SGD(m.parameters(), lr=0.1), m, steps=2, ascent_every=2)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="ascent_every must be an integer >= 1"):
            AWP(torch.optim.SGD(m.parameters(), lr=0.1), m, ascent_every=bad)
    a = AWP(torch.optim.SGD(m.parameters(), lr=0.1), m, ascent_every=2)
    _train(m, a, 1)
    sd = a.state_dict()
    other = Net(bn=True).double()
    other.fc = nn.Linear(4 * 6 * 6, 7).double()
    b = AWP(torch.optim.SGD(other.parameters(), lr=0.1), other, ascent_every=2)
    with pytest.raises(ValueError, match="shape"):
        b.load_state_dict(sd)
    m4 = make(0)
    c = AWP(torch.optim.SGD(m4.parameters(), lr=0.1), m4)
    with pytest.warns(UserWarning, match="ascent_every=2"):
        c.load_state_dict(sd)
    assert c.ascent_every == 1 and c._ascent.stored is None


def test_ascent_every_nonfinite_direction_not_reused():
    model = make(0)
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.01, ascent_every=3)
    x, y = batch(1)
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert not awp.perturb(lambda: F.cross_entropy(model(x), y) * float("nan"))
    awp.step()
    called = []
    assert awp.perturb(lambda: called.append(1) or F.cross_entropy(model(x), y))
    assert called == [1]  # nothing finite stored: a fresh direction


# ----------------------------------------------------------------------------- 2 processes
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from _dist_launch import skip_without_gloo
    skip_without_gloo()
    return launch("_cheap_worker.py", tmp_path_factory.mktemp("cheap"))


@pytest.mark.parametrize("key,reduces", [("ddp_attack_every1", [1, 1, 1, 1]), ("ddp_every_every3", [1, 0, 0, 1]),
                                         ("ddp_attack_every2", [1, 0, 1, 0])])
def test_ddp_global_equals_single_process(ranks, key, reduces):
    for rep in ranks:
        assert rep[key]["max_rel"] < 1e-10, rep[key]
        assert rep[key]["ranks_equal"] is True
        assert rep[key]["all_reduce"] == reduces  # the pending / fresh direction synced once, a re-use: none


def test_fsdp2_ascent_every_state_dict_and_attack_refused(ranks):
    for rep in ranks:
        assert rep["fsdp_direction_shapes"] == rep["fsdp_param_shapes"]  # whole tensors, any world size
        assert rep["fsdp_every3_resumed"]["max_rel"] < 1e-10
        assert rep["fsdp_every3_resumed"]["ranks_equal"] is True
        assert "FSDP2" in rep["fsdp_attack_error"] and "\n" not in rep["fsdp_attack_error"]


# ----------------------------------------------------------------------------- 2 processes: sub-batch and momentum ascents (test_cheap_ascent_more.py)
@pytest.mark.parametrize("key,reduces", [("ddp_subbatch", [1, 1, 1, 1]), ("ddp_momentum", [0, 0, 0, 0])])
def test_ddp_new_ascents_equal_one_process(ranks, key, reduces):
    for rep in ranks:
        assert rep[key]["max_rel"] < 1e-10, rep[key]
        assert rep[key]["ranks_equal"] is True
        assert rep[key]["all_reduce"] == reduces  # the sub-batch direction synced once; momentum: no collective


def test_fsdp2_momentum_equals_one_process(ranks):
    for rep in ranks:
        assert rep["fsdp_momentum"]["max_rel"] < 1e-10 and rep["fsdp_momentum"]["ranks_equal"] is True


# ----------------------------------------------------------------------------- CLI
CLI = ["--data", "synthetic", "--image-size", "8", "--model", "small-cnn", "--width", "4", "--batch-size", "32",
       "--attack-steps", "2", "--eval-steps", "1", "--eval-samples", "32", "--train-eval-samples", "32",
       "--train-samples", "96", "--val-samples", "32", "--epochs", "2", "--seed", "3", "--no-progress", "--quiet",
       "--no-plot", "--threads", "1", "--awp-ascent", "attack", "--awp-every", "2", "--attack-bn", "train"]


def test_cli_attack_every2_runs_and_resumes_bit_exactly(tmp_path):
    from awpfast import train as T
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert T.main(CLI + ["--out", full]) == 0
    assert T.main(CLI + ["--out", part, "--stop-after", "1"]) == 0
    assert T.main(["--resume", os.path.join(part, "last.pt"), "--no-progress", "--quiet"]) == 0
    with open(os.path.join(full, "args.json")) as f:
        rec = json.load(f)
    assert rec["awp_ascent"] == "attack" and rec["awp_every"] == 2
    a = torch.load(os.path.join(full, "last.pt"), weights_only=False)
    b = torch.load(os.path.join(part, "last.pt"), weights_only=False)
    assert a["args"]["awp_ascent"] == "attack" and a["args"]["awp_every"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    sa, sb = a["optimizer"], b["optimizer"]
    assert all(torch.equal(sa["state"][i]["momentum_buffer"], sb["state"][i]["momentum_buffer"]) for i in sa["state"])
    da, db = sa["awpfast"]["direction"]["tensors"], sb["awpfast"]["direction"]["tensors"]
    assert all(torch.equal(p, q) for p, q in zip(da, db))
    assert sa["awpfast"]["ascent_calls"] == sb["awpfast"]["ascent_calls"] == 6  # 3 batches x 2 epochs
