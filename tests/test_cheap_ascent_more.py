"""Two more cheap AWP ascents: the separate ascent on a sub-batch (``AWP(..., ascent_fraction=F)``,
``--awp-ascent-fraction F``) and the direction from the base optimizer's momentum
(``AWP(..., ascent="momentum")``, ``--awp-ascent momentum``); and the diagnostics that measure them
(``ascent_direction()``, ``direction_cosines()``, ``--awp-cosine-every``). Float64 against an
independent computation on fresh random inputs; 2-process gloo checks in ``_cheap_worker.py``, asserted in ``test_cheap_ascent.py``."""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from awpfast import AWP
from awpfast.attacks import PGD
from test_cheap_ascent import Counting, batch, make, rel


def _rows(seed, n, fraction, draws):
    """The rows the wrapper draws: ceil(F n) of n without replacement, sorted, from its own generator."""
    g = torch.Generator().manual_seed(seed)
    k = math.ceil(fraction * n)
    return [torch.randperm(n, generator=g)[:k].sort().values for _ in range(draws)]


def _weights(m):
    return [m.conv.weight, m.fc.weight]


# ----------------------------------------------------------------------------- sub-batch
@pytest.mark.parametrize("fraction,n", [(0.25, 8), (0.5, 7), (0.3, 10), (1 / 7, 7)])
def test_subbatch_direction_is_the_gradient_on_the_drawn_rows(fraction, n):
    for seed in range(3):
        model = make(seed).train()
        x, y = batch(20 + seed, n=n)
        rows = _rows(11, n, fraction, 2)
        awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.01, ascent_fraction=fraction,
                  ascent_seed=11)
        for step in range(2):
            ref = copy.deepcopy(model).train()
            r = rows[step]
            g = torch.autograd.grad(F.cross_entropy(ref(x[r]), y[r]), _weights(ref))
            w0 = [w.detach().clone() for w in _weights(model)]
            bn = {k: v.clone() for k, v in model.bn.state_dict().items()}
            assert awp.perturb(lambda pick: F.cross_entropy(model(pick(x)), pick(y)))
            for p, w, gl in zip(_weights(model), w0, g):
                assert rel(p.detach() - w, 0.01 * w.norm() * gl / gl.norm()) < 1e-10
            assert all(torch.equal(v, model.bn.state_dict()[k]) for k, v in bn.items())  # BN untouched
            awp.restore()


def test_subbatch_forward_sees_ceil_f_n_rows_and_the_pass_count_is_unchanged():
    model = make(0)
    seen = []

    class Rows(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            seen.append(x.shape[0])
            return self.m(x)
    counted = Rows(model)
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.01, ascent_fraction=0.25)
    x, y = batch(1, n=12)
    x_adv = PGD(counted, eps=0.1, alpha=0.03, steps=3)(x, y)
    assert awp.perturb(lambda pick: F.cross_entropy(counted(pick(x_adv)), pick(y)))
    awp.zero_grad()
    F.cross_entropy(counted(x_adv), y).backward()
    awp.step()
    assert seen == [12, 12, 12, 3, 12]  # 3 attack steps, the ascent on 3 of 12 rows, the descent


def test_subbatch_rows_are_reproducible_and_resume_exactly():
    def build():
        m = make(4)
        return m, AWP(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), m, gamma=0.01,
                      ascent_fraction=0.5, ascent_seed=3)

    def train(m, a, start, steps):
        for s in range(start, start + steps):
            x, y = batch(60 + s)
            a.perturb(lambda pick: F.cross_entropy(m(pick(x)), pick(y)))
            a.zero_grad()
            F.cross_entropy(m(x), y).backward()
            a.step()
    m1, a1 = build()
    train(m1, a1, 0, 6)
    m2, a2 = build()
    train(m2, a2, 0, 3)
    sd, msd = copy.deepcopy(a2.state_dict()), copy.deepcopy(m2.state_dict())
    assert "ascent_rng" in sd["awpfast"] and sd["awpfast"]["ascent_fraction"] == 0.5
    m3, a3 = build()
    m3.load_state_dict(msd)
    a3.load_state_dict(sd)
    train(m3, a3, 3, 3)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters()))
    m4, a4 = build()  # without the generator's state the rows differ: the resume above is not vacuous
    m4.load_state_dict(msd)
    a4.load_state_dict({k: v for k, v in sd.items() if k != "awpfast"})
    train(m4, a4, 3, 3)
    assert not all(torch.equal(p, q) for p, q in zip(m1.parameters(), m4.parameters()))


def test_subbatch_seed_defaults_to_torchs_initial_seed():
    torch.manual_seed(123)
    m = make(0)
    a = AWP(torch.optim.SGD(m.parameters(), lr=0.1), m, ascent_fraction=0.5)
    b = AWP(torch.optim.SGD(m.parameters(), lr=0.1), m, ascent_fraction=0.5, ascent_seed=torch.initial_seed())
    assert torch.equal(a._ascent.rows_gen.get_state(), b._ascent.rows_gen.get_state())


def test_subbatch_errors():
    m = make(0)
    x, y = batch(0)
    for bad in (0, 1.5, -0.1, "0.5", True, float("nan")):
        with pytest.raises(ValueError, match="ascent_fraction must be a number in \\(0, 1\\]"):
            AWP(torch.optim.SGD(m.parameters(), lr=0.1), m, ascent_fraction=bad)
    with pytest.raises(ValueError, match="ascent_seed"):
        AWP(torch.optim.SGD(m.parameters(), lr=0.1), m, ascent_fraction=0.5, ascent_seed=-1)
    a = AWP(torch.optim.SGD(m.parameters(), lr=0.1), m, ascent_fraction=0.5)
    with pytest.raises(TypeError, match="one argument, pick"):
        a.perturb(lambda: F.cross_entropy(m(x), y))
    with pytest.raises(ValueError, match="never called pick"):
        a.perturb(lambda pick: F.cross_entropy(m(x), y))
    with pytest.raises(ValueError, match="different batch sizes"):
        a.perturb(lambda pick: F.cross_entropy(*pick(m(x), y[:3])))
    assert not a.is_perturbed
    full = AWP(torch.optim.SGD(m.parameters(), lr=0.1), m)  # fraction 1: the closure takes no argument
    assert full.perturb(lambda: F.cross_entropy(m(x), y))
    full.restore()


# ----------------------------------------------------------------------------- momentum
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_momentum_direction_is_the_optimizers_buffer_rescaled(opt):
    model = make(2)
    base = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) if opt == "sgd"
            else torch.optim.Adam(model.parameters(), lr=1e-3))
    awp = AWP(base, model, gamma=0.02, ascent="momentum")
    x, y = batch(3)
    with pytest.warns(UserWarning, match="no momentum yet"):
        assert awp.perturb() is False  # before the first base step: nothing to perturb along
    awp.zero_grad()
    F.cross_entropy(model(x), y).backward()
    awp.step()
    for step in range(3):
        key = "momentum_buffer" if opt == "sgd" else "exp_avg"
        bufs = [base.state[w][key].clone() for w in _weights(model)]
        w0 = [w.detach().clone() for w in _weights(model)]
        calls = []
        assert awp.perturb()
        for p, w, b in zip(_weights(model), w0, bufs):
            assert rel(p.detach() - w, 0.02 * w.norm() * b / b.norm()) < 1e-12
        awp.zero_grad()
        F.cross_entropy(model(x), y).backward()
        awp.step()
        assert calls == []


def test_momentum_runs_no_ascent_pass():
    model = make(0)
    counted = Counting(model)
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, gamma=0.01, ascent="momentum")
    x, y = batch(1)
    for step in range(3):
        counted.calls = 0
        x_adv = PGD(counted, eps=0.1, alpha=0.03, steps=4)(x, y)
        with pytest.warns(UserWarning) if step == 0 else _nothing():
            awp.perturb()
        awp.zero_grad()
        F.cross_entropy(counted(x_adv), y).backward()
        awp.step()
        assert counted.calls == 4 + 1  # the attack and the descent only


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_momentum_errors_and_resume():
    m = make(0)
    with pytest.raises(ValueError, match="keeps none"):
        AWP(torch.optim.SGD(m.parameters(), lr=0.1), m, ascent="momentum")
    with pytest.raises(ValueError, match="ascent must be one of"):
        AWP(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m, ascent="adam")
    with pytest.raises(ValueError, match="runs no ascent pass"):
        AWP(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m, ascent="momentum", ascent_every=2)
    a = AWP(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m, ascent="momentum")
    x, y = batch(0)
    with pytest.raises(TypeError, match="without a closure"):
        a.perturb(lambda: F.cross_entropy(m(x), y))

    def build():
        mm = make(6)
        return mm, AWP(torch.optim.SGD(mm.parameters(), lr=0.1, momentum=0.9), mm, gamma=0.01, ascent="momentum")

    def train(mm, aa, start, steps):
        for s in range(start, start + steps):
            xb, yb = batch(70 + s)
            aa.perturb()
            aa.zero_grad()
            F.cross_entropy(mm(xb), yb).backward()
            aa.step()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m1, a1 = build()
        train(m1, a1, 0, 5)
        m2, a2 = build()
        train(m2, a2, 0, 2)
    sd, msd = copy.deepcopy(a2.state_dict()), copy.deepcopy(m2.state_dict())
    assert sd["awpfast"]["ascent"] == "momentum"
    m3, a3 = build()
    m3.load_state_dict(msd)
    a3.load_state_dict(sd)
    train(m3, a3, 2, 3)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters()))


# ----------------------------------------------------------------------------- diagnostics
def test_direction_cosines_of_the_exact_ascent_are_one_and_of_momentum_match_by_hand():
    model = make(1)
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, gamma=0.01)
    x, y = batch(2)
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    exact = awp.ascent_direction(closure)
    assert [tuple(e.shape) for e in exact] == [tuple(w.shape) for w in _weights(model)]
    assert all(p.grad is None for p in model.parameters())
    awp.perturb(closure)
    cos = awp.direction_cosines(exact)
    assert cos.dtype == torch.float64 and torch.allclose(cos, torch.ones(2, dtype=torch.float64), atol=1e-12)
    awp.zero_grad()
    F.cross_entropy(model(x), y).backward()
    awp.step()
    mom = AWP(awp.optimizer, model, gamma=0.01, ascent="momentum")
    exact = mom.ascent_direction(closure)
    bufs = [awp.optimizer.state[w]["momentum_buffer"] for w in _weights(model)]
    assert mom.perturb()
    want = torch.tensor([float((b * e).sum() / (b.norm() * e.norm())) for b, e in zip(bufs, exact)],
                        dtype=torch.float64)
    assert torch.allclose(mom.direction_cosines(exact), want, atol=1e-12)
    mom.restore()
    with pytest.raises(RuntimeError, match="needs the weights perturbed"):
        mom.direction_cosines(exact)


def test_ascent_direction_of_a_subbatch_closure_uses_the_whole_batch_and_draws_nothing():
    model = make(3)
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, ascent_fraction=0.25, ascent_seed=5)
    x, y = batch(4, n=8)
    state = awp._ascent.rows_gen.get_state()
    d = awp.ascent_direction(lambda pick: F.cross_entropy(model(pick(x)), pick(y)))
    ref = copy.deepcopy(model).train()
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), _weights(ref))
    assert all(rel(a, b) < 1e-10 for a, b in zip(d, g))
    assert torch.equal(awp._ascent.rows_gen.get_state(), state)


# ----------------------------------------------------------------------------- CLI
CLI = ["--data", "synthetic", "--image-size", "8", "--model", "small-cnn", "--width", "4", "--batch-size", "32",
       "--attack-steps", "2", "--eval-steps", "1", "--eval-samples", "32", "--train-eval-samples", "32",
       "--train-samples", "96", "--val-samples", "32", "--epochs", "2", "--seed", "3", "--no-progress", "--quiet",
       "--no-plot", "--threads", "1", "--awp-cosine-every", "2"]


@pytest.mark.parametrize("extra", [["--awp-ascent-fraction", "0.25"], ["--awp-ascent", "momentum"]],
                         ids=["subbatch", "momentum"])
def test_cli_new_ascents_run_log_cosines_and_resume_bit_exactly(tmp_path, extra):
    import warnings

    from awpfast import train as T
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert T.main(CLI + extra + ["--out", full]) == 0
        assert T.main(CLI + extra + ["--out", part, "--stop-after", "1"]) == 0
        assert T.main(["--resume", os.path.join(part, "last.pt"), "--no-progress", "--quiet"]) == 0
    rec = json.load(open(os.path.join(full, "args.json")))
    assert rec["awp_ascent_fraction"] == (0.25 if "0.25" in extra else 1.0)
    assert rec["awp_ascent"] == ("momentum" if "momentum" in extra else "separate")
    rows = [json.loads(line) for line in open(os.path.join(full, "metrics.jsonl"))]
    assert all(r["awp_cosine_samples"] >= 1 and len(r["awp_cosine"]) == 6 for r in rows)
    assert all(-1 <= c <= 1 for r in rows for c in r["awp_cosine"])
    a = torch.load(os.path.join(full, "last.pt"), weights_only=False)
    b = torch.load(os.path.join(part, "last.pt"), weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert [r["awp_cosine"] for r in rows] == [r["awp_cosine"] for r in
                                               map(json.loads, open(os.path.join(part, "metrics.jsonl")))]


def test_cli_cosine_logging_leaves_the_trajectory_unchanged(tmp_path):
    from awpfast import train as T
    base = CLI[:-2]  # without --awp-cosine-every
    assert T.main(base + ["--awp-ascent", "attack", "--out", str(tmp_path / "a")]) == 0
    assert T.main(base + ["--awp-ascent", "attack", "--awp-cosine-every", "1", "--out", str(tmp_path / "b")]) == 0
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


@pytest.mark.parametrize("extra,msg", [
    (["--awp-ascent-fraction", "0"], "--awp-ascent-fraction must be a finite number > 0 and <= 1.0"),
    (["--awp-ascent", "attack", "--awp-ascent-fraction", "0.5"], "applies to the separate ascent pass"),
    (["--awp-ascent", "momentum", "--momentum", "0"], "--momentum is 0"),
    (["--awp-ascent", "momentum", "--awp-every", "2"], "nothing to save"),
    (["--awp-cosine-every", "-1"], "--awp-cosine-every must be an integer >= 0")])
def test_cli_new_options_are_checked_up_front(tmp_path, capsys, extra, msg):
    from awpfast import train as T
    assert T.main(CLI + extra + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x")
