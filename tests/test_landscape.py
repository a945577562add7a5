"""awpfast.landscape: filter-normalized directions, the weight loss landscape, flatness, the CLI."""
import copy
import json
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from awpfast import ops
from awpfast import landscape as L
from awpfast.errors import UsageError
from awpfast.attacks import PGD
from awpfast.models.small_cnn import SmallCNN
from conftest import threads

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def _model(seed=0, dtype=torch.float32, width=4):
    torch.manual_seed(seed)
    m = SmallCNN(width=width, hidden=16).to(dtype)
    # non-trivial BN statistics and affine parameters
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.rand(16, 3, 8, 8, dtype=dtype))
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m


def _data(n=20, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def _snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _bitwise_equal(m, snap):
    sd = m.state_dict()
    return all(torch.equal(sd[k], v) and sd[k].dtype == v.dtype for k, v in snap.items())


# ----------------------------------------------------------------------------- directions
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_filter_normalized_direction_norms_and_zeros(dtype):
    m = _model(dtype=dtype)
    with torch.no_grad():
        m.fc1.weight[3].zero_()  # a dead filter gets a zero direction
    d = L.filter_normalized_direction(m, seed=0)
    assert list(d) == [n for n, _ in m.named_parameters()]
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    n_multi = 0
    for name, p in m.named_parameters():
        t = d[name]
        assert t.shape == p.shape and t.dtype == p.dtype and t.device == p.device
        assert torch.isfinite(t).all()
        if p.dim() <= 1:
            assert torch.equal(t, torch.zeros_like(p)), name  # biases and BatchNorm parameters
            continue
        n_multi += 1
        wn = p.detach().double().reshape(p.shape[0], -1).norm(dim=1)
        dn = t.double().reshape(p.shape[0], -1).norm(dim=1)
        assert torch.allclose(dn, wn, rtol=tol, atol=1e-30), name
        assert not torch.equal(t, p.detach())  # random, not the weight itself
    assert n_multi == 6  # four convolutions and two linear layers
    assert torch.equal(d["fc1.weight"][3], torch.zeros_like(d["fc1.weight"][3]))


def test_filter_normalized_direction_seeded_and_ignore_none():
    m = _model()
    a, b = L.filter_normalized_direction(m, seed=5), L.filter_normalized_direction(m, seed=5)
    c = L.filter_normalized_direction(m, seed=6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].dim() > 1)
    # one seed: the same draw for a float64 copy of the model (drawn in float64, then cast)
    d64 = L.filter_normalized_direction(copy.deepcopy(m).double(), seed=5)
    for k in a:
        torch.testing.assert_close(a[k], d64[k].float(), rtol=1e-6, atol=1e-7)
    keep = L.filter_normalized_direction(m, seed=5, ignore=None)
    for name, p in m.named_parameters():
        if p.dim() <= 1:
            assert torch.equal(keep[name], p.detach())
        else:
            assert torch.equal(keep[name], a[name])
    with pytest.raises(ValueError, match="biasbn"):
        L.filter_normalized_direction(m, ignore="bn")


# ----------------------------------------------------------------------------- the landscape
def _independent(model, direction, alpha, x, y, attack_kw, seed):
    """The loss at w + alpha*d computed without awpfast.landscape: a copy, weights set by hand."""
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(p + alpha * direction[name])
    torch.manual_seed(seed)
    xa = PGD(m, **attack_kw)(x, y) if attack_kw else x
    with torch.no_grad():
        logits = m(xa)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_loss_at_alpha_equals_independent_computation(backend):
    if backend not in ops.available_backends():
        pytest.skip(f"backend {backend} is not available here")
    m = _model(3, dtype=torch.float64).train()
    x, y = _data(12, dtype=torch.float64)
    d = L.filter_normalized_direction(m, seed=2)
    kw = dict(eps=8 / 255, alpha=2 / 255, steps=3)
    alphas = [-0.6, 0.0, 0.35, 1.0]
    res = L.weight_landscape(m, x, y, alphas, direction=d, attack=PGD(m, **kw), seed=9, batch_size=64,
                             backend=backend)
    assert res["alpha"] == alphas and set(res) == {"alpha", "loss", "acc"}
    for a, loss, acc in zip(alphas, res["loss"], res["acc"]):
        want_loss, want_acc = _independent(m, d, a, x, y, kw, seed=9)
        assert abs(loss - want_loss) <= 1e-12 * max(1.0, want_loss), (a, loss, want_loss)
        assert acc == want_acc
    assert m.training  # the caller's mode is back
    # the loss really depends on alpha (the weights did move)
    assert max(res["loss"]) - min(res["loss"]) > 1e-3


def test_clean_landscape_float32_batched_and_default_direction():
    m = _model(4)
    x, y = _data(23)
    res = L.weight_landscape(m, x, y, [-0.5, 0.5], seed=3, batch_size=5)  # default direction, seed 3
    d = L.filter_normalized_direction(m, seed=3)
    for a, loss, acc in zip(res["alpha"], res["loss"], res["acc"]):
        want_loss, want_acc = _independent(m, d, a, x, y, None, seed=0)
        assert abs(loss - want_loss) <= 2e-6 * max(1.0, want_loss)
        assert abs(acc - want_acc) < 1e-12
    # uint8 images on the CPU are scaled by 1/255 like the loaders do
    xu = (x * 255).round().to(torch.uint8)
    r8 = L.weight_landscape(m, xu, y, [0.5], direction=d, batch_size=7)
    want, _ = _independent(m, d, 0.5, xu.float() / 255, y, None, seed=0)
    assert abs(r8["loss"][0] - want) <= 2e-6 * max(1.0, want)


def test_batches_do_not_change_the_adversarial_loss():
    m = _model(5, dtype=torch.float64)
    x, y = _data(17, dtype=torch.float64)
    atk = PGD(m, eps=8 / 255, alpha=2 / 255, steps=2, random_start=False)
    a = L.weight_landscape(m, x, y, [0.3, -0.2], attack=atk, batch_size=4)
    b = L.weight_landscape(m, x, y, [0.3, -0.2], attack=atk, batch_size=100)
    for u, v in zip(a["loss"], b["loss"]):
        assert abs(u - v) <= 1e-12 * max(1.0, v)
    assert a["acc"] == b["acc"]


def test_adversarial_loss_above_clean_and_common_random_numbers():
    m = _model(6)
    x, y = _data(16)
    alphas = [-0.5, 0.0, 0.5]
    clean = L.weight_landscape(m, x, y, alphas, seed=1)
    adv = L.weight_landscape(m, x, y, alphas, attack=PGD(m, eps=8 / 255, alpha=2 / 255, steps=3), seed=1)
    for c, a in zip(clean["loss"], adv["loss"]):
        assert a > c + 1e-4
    for c, a in zip(clean["acc"], adv["acc"]):
        assert a <= c
    # the same seed gives the same numbers; another seed another PGD start
    again = L.weight_landscape(m, x, y, alphas, attack=PGD(m, eps=8 / 255, alpha=2 / 255, steps=3), seed=1)
    assert again == adv
    # g(0) does not depend on the direction (same weights, same seeded attack)
    other = L.weight_landscape(m, x, y, [0.0], direction=L.filter_normalized_direction(m, seed=7),
                               attack=PGD(m, eps=8 / 255, alpha=2 / 255, steps=3), seed=1)
    assert other["loss"][0] == adv["loss"][1]


def test_weights_buffers_mode_rng_grads_restored_bitwise():
    m = _model(7).train()
    m.features[1][1].eval()  # a mixed mode the caller set on purpose
    modes = [mod.training for mod in m.modules()]
    x, y = _data(10)
    snap = _snapshot(m)
    rng = torch.get_rng_state()
    L.weight_landscape(m, x, y, [-1.0, 0.25, 0.0, 2.0], attack=PGD(m, steps=2), batch_size=4)
    assert _bitwise_equal(m, snap)
    assert [mod.training for mod in m.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in m.parameters())


class _Boom(Exception):
    pass


@pytest.mark.parametrize("where", ["attack", "model"])
def test_exact_restore_when_the_attack_raises_midway(where):
    m = _model(8).train()
    x, y = _data(12)
    snap = _snapshot(m)
    modes = [mod.training for mod in m.modules()]
    rng = torch.get_rng_state()
    inner = PGD(m, steps=2)
    calls = {"n": 0}

    def attack(xb, yb):
        calls["n"] += 1
        if where == "attack" and calls["n"] == 3:  # second alpha, first batch: weights are at w + a*d
            raise _Boom("attack failed")
        return inner(xb, yb)

    if where == "model":  # raise inside a forward, in the middle of the PGD loop
        count = {"n": 0}

        def hook(mod, inp, out):
            count["n"] += 1
            if count["n"] == 9:
                raise _Boom("forward failed")
        h = m.fc2.register_forward_hook(hook)
    moved = []
    real = ops.add_scaled_
    before = [snap[n].reshape(-1) for n, p in m.named_parameters() if p.dim() > 1]

    def spy(params, *a, **k):
        real(params, *a, **k)
        moved.append(len(params) == len(before) and not all(torch.equal(p, b) for p, b in zip(params, before)))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ops, "add_scaled_", spy)
            with pytest.raises(_Boom):
                L.weight_landscape(m, x, y, [0.5, -0.75, 1.0], attack=attack, batch_size=6)
    finally:
        if where == "model":
            h.remove()
    assert moved and all(moved), "the weights were never moved before the failure"
    assert _bitwise_equal(m, snap)
    assert [mod.training for mod in m.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("backend", [None] + list(ops.BACKENDS))
def test_one_seam_call_per_alpha(backend, monkeypatch):
    if backend is not None and backend not in ops.available_backends():
        pytest.skip(f"backend {backend} is not available here")
    m = _model(9)
    x, y = _data(6)
    calls = []
    real_add, real_restore = ops.add_scaled_, ops.restore_

    def add(params, directions, scale, **kw):
        calls.append(("add", len(params), scale, kw.get("backend"), kw.get("base") is not None))
        return real_add(params, directions, scale, **kw)

    def restore(params, backups, **kw):
        calls.append(("restore", len(params), None, kw.get("backend"), True))
        return real_restore(params, backups, **kw)

    monkeypatch.setattr(ops, "add_scaled_", add)
    monkeypatch.setattr(ops, "restore_", restore)
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
    L.weight_landscape(m, x, y, alphas, batch_size=6, backend=backend)
    n_multi = sum(p.dim() > 1 for p in m.parameters())
    # one call per alpha (alpha = 0 is the exact restore), then the final restore
    assert [c[0] for c in calls] == ["add", "add", "restore", "add", "add", "restore"]
    assert all(c[1] == n_multi and c[3] == backend and c[4] for c in calls)
    assert [c[2] for c in calls if c[0] == "add"] == [-1.0, -0.5, 0.5, 1.0]


def test_bad_inputs_raise_and_touch_nothing():
    m = _model(10)
    x, y = _data(4)
    snap = _snapshot(m)
    d = L.filter_normalized_direction(m)
    with pytest.raises(ValueError, match="empty"):
        L.weight_landscape(m, x, y, [])
    with pytest.raises(ValueError, match="finite"):
        L.weight_landscape(m, x, y, [0.0, float("nan")])
    with pytest.raises(ValueError, match="not parameters"):
        L.weight_landscape(m, x, y, [0.5], direction={"nope.weight": torch.zeros(3)})
    bad = dict(d)
    bad["fc2.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="shape"):
        L.weight_landscape(m, x, y, [0.5], direction=bad)
    nan = dict(d)
    nan["fc2.weight"] = d["fc2.weight"].clone()
    nan["fc2.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        L.weight_landscape(m, x, y, [0.5], direction=nan)
    with pytest.raises(ValueError, match="bn_train"):
        L.weight_landscape(m, x, y, [0.5], attack=PGD(m, bn_train=True))
    with pytest.raises(ValueError, match="labels"):
        L.weight_landscape(m, x, y[:3], [0.5])
    with pytest.raises(ValueError, match="non-empty"):
        L.weight_landscape(m, x[:0], y[:0], [0.5])
    assert _bitwise_equal(m, snap)


def test_partial_direction_moves_only_named_parameters():
    m = _model(11)
    x, y = _data(8)
    d = L.filter_normalized_direction(m)
    only = {"fc2.weight": d["fc2.weight"]}
    res = L.weight_landscape(m, x, y, [0.8], direction=only)
    full = {k: (v if k == "fc2.weight" else torch.zeros_like(v)) for k, v in d.items()}
    want, _ = _independent(m, full, 0.8, x, y, None, seed=0)
    assert abs(res["loss"][0] - want) <= 2e-6 * max(1.0, want)


# ----------------------------------------------------------------------------- flatness
def test_flatness_definition():
    m = _model(12, dtype=torch.float64)
    x, y = _data(10, dtype=torch.float64)
    atk = PGD(m, eps=8 / 255, alpha=2 / 255, steps=2)
    snap = _snapshot(m)
    f = L.flatness(m, x, y, 0.5, 2, atk, seed=4)
    dirs = [L.filter_normalized_direction(m, seed=4), L.filter_normalized_direction(m, seed=5)]
    g0 = L.weight_landscape(m, x, y, [0.0], direction=dirs[0], attack=atk, seed=4)["loss"][0]
    rises = [L.weight_landscape(m, x, y, [0.5], direction=d, attack=atk, seed=4)["loss"][0] - g0 for d in dirs]
    assert abs(f - sum(rises) / 2) <= 1e-12
    assert f == L.flatness(m, x, y, 0.5, dirs, atk, seed=4)  # a count = the seeded list
    assert L.flatness(m, x, y, 0.0, 3, atk) == 0.0
    assert L.flatness(m, x, y, 0.5, dirs[0], atk, seed=4) == rises[0]
    assert _bitwise_equal(m, snap)
    # a wider step climbs higher here (a point near a minimum of the clean loss is not needed:
    # the test only checks that the number follows the definition for another alpha as well)
    f2 = L.flatness(m, x, y, 1.0, dirs, atk, seed=4)
    g1 = [L.weight_landscape(m, x, y, [1.0], direction=d, attack=atk, seed=4)["loss"][0] - g0 for d in dirs]
    assert abs(f2 - sum(g1) / 2) <= 1e-12
    with pytest.raises(ValueError):
        L.flatness(m, x, y, 0.5, 0, atk)
    with pytest.raises(ValueError):
        L.flatness(m, x, y, float("inf"), 1, atk)


# ----------------------------------------------------------------------------- CLI
def test_parse_alphas():
    assert L.parse_alphas("-1:1:5") == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert L.parse_alphas("-1:1:21")[10] == 0.0 and len(L.parse_alphas("-1:1:21")) == 21
    assert L.parse_alphas("0,0.5, -2") == [0.0, 0.5, -2.0]
    for bad in ("1:-1:5", "-1:1:1", "a:b:c", "1:2", "", "0,nan", "-1:inf:3"):
        with pytest.raises(UsageError):
            L.parse_alphas(bad)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A real awpfast-train checkpoint (one tiny epoch) and a hand-built AT (no AWP) one."""
    from awpfast import train as T
    from awpfast import models as models_
    root = tmp_path_factory.mktemp("runs")
    out = str(root / "atawp")
    with threads(1):
        assert T.main(["--data", "synthetic", "--image-size", "8", "--model", "small-cnn", "--width", "4",
                       "--batch-size", "64", "--attack-steps", "1", "--eval-steps", "1", "--eval-samples", "16",
                       "--train-eval-samples", "16", "--train-samples", "64", "--epochs", "1", "--out", out,
                       "--no-progress", "--quiet", "--no-plot"]) == 0
    real = os.path.join(out, "last.pt")
    ck = torch.load(real, weights_only=False)
    torch.manual_seed(1)
    m = models_.build_model("small-cnn", 10, 3, 4)
    hand = dict(ck, model=m.state_dict(), args=dict(ck["args"], awp_gamma=0.0, method="at"), epoch=7)
    os.makedirs(root / "at")
    path = str(root / "at" / "last.pt")
    torch.save(hand, path)
    return {"awp": real, "at": path, "root": root}


def _cli(argv, capsys):
    rc = L.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_writes_json_and_png(ckpts, tmp_path, capsys):
    out = str(tmp_path / "ls")
    rc, text, err = _cli([ckpts["at"], ckpts["awp"], "--alphas", "-1:1:5", "--directions", "2", "--samples", "12",
                          "--attack-steps", "2", "--out", out, "--batch-size", "5"], capsys)
    assert rc == 0, err
    assert "\r" not in err and "pt/s" not in err  # stderr is no terminal here: no progress bar in the log
    doc = json.load(open(os.path.join(out, "landscape.json")))
    assert doc["alphas"] == [-1.0, -0.5, 0.0, 0.5, 1.0] and doc["directions"] == 2 and doc["samples"] == 12
    assert doc["attack"]["steps"] == 2 and abs(doc["attack"]["eps"] - 8 / 255) < 1e-12
    labels = [r["label"] for r in doc["checkpoints"]]
    assert labels == ["AT (epoch 7)", "AT-AWP (epoch 1)"]
    for r in doc["checkpoints"]:
        assert len(r["loss"]) == 2 and all(len(row) == 5 for row in r["loss"])
        assert r["loss"][0][2] == r["loss"][1][2]  # alpha = 0: one point, whatever the direction
        assert r["flatness"][2] == 0.0
        assert all(0 <= a <= 1 for row in r["acc"] for a in row)
        assert all(v == v for row in r["loss"] for v in row)  # no NaN
    with open(os.path.join(out, "landscape.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "AT (epoch 7)" in text and "wrote" in text
    # the CLI numbers are weight_landscape's
    from awpfast import train as T
    from awpfast import models as models_
    ck = torch.load(ckpts["awp"], weights_only=False)
    m = models_.build_model("small-cnn", 10, 3, 4)
    m.load_state_dict(ck["model"])
    from awpfast.data import load_dataset
    ds = load_dataset("synthetic", None, 8)
    res = L.weight_landscape(m, ds.test.x[:12], ds.test.y[:12], doc["alphas"],
                             direction=L.filter_normalized_direction(m, seed=1),
                             attack=PGD(m, eps=8 / 255, alpha=2 / 255, steps=2), seed=0, batch_size=5)
    assert res["loss"] == doc["checkpoints"][1]["loss"][1]


def test_cli_refuses_to_overwrite(ckpts, tmp_path, capsys):
    out = str(tmp_path / "ls")
    base = [ckpts["at"], "--alphas", "0,0.5", "--directions", "1", "--samples", "4", "--attack-steps", "0",
            "--out", out, "--no-progress", "--no-plot"]
    assert _cli(base, capsys)[0] == 0
    path = os.path.join(out, "landscape.json")
    before = open(path).read()
    os.utime(path, (0, 0))
    rc, _, err = _cli(base + ["--alphas", "0,1"], capsys)
    assert rc == 2 and "--overwrite" in err and err.count("\n") == 1 and "Traceback" not in err
    assert open(path).read() == before and os.stat(path).st_mtime == 0
    rc, _, err = _cli(base + ["--alphas", "0,1", "--overwrite"], capsys)
    assert rc == 0, err
    assert json.load(open(path))["alphas"] == [0.0, 1.0]
    assert json.load(open(path))["attack"] is None  # --attack-steps 0: the clean landscape


@pytest.mark.parametrize("case", ["missing", "text", "format", "weights", "range", "reversed", "directions",
                                  "labels", "eps"])
def test_cli_errors_are_one_line(case, ckpts, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AWPFAST_DEBUG", raising=False)
    out = str(tmp_path / "ls")
    ck = ckpts["at"]
    extra = []
    if case == "missing":
        ck = str(tmp_path / "nope.pt")
    elif case == "text":
        ck = str(tmp_path / "notes.pt")
        open(ck, "w").write("not a checkpoint\n")
    elif case == "format":
        ck = str(tmp_path / "sd.pt")
        torch.save({"format": "something/else", "model": {}}, ck)
    elif case == "weights":
        d = torch.load(ckpts["at"], weights_only=False)
        d["args"] = dict(d["args"], width=8)
        ck = str(tmp_path / "wrong.pt")
        torch.save(d, ck)
    elif case == "range":
        extra = ["--alphas", "-1:1"]
    elif case == "reversed":
        extra = ["--alphas", "1:-1:5"]
    elif case == "directions":
        extra = ["--directions", "0"]
    elif case == "labels":
        extra = ["--labels", "a", "b"]
    elif case == "eps":
        extra = ["--eps", "8/0"]
    rc, _, err = _cli([ck, "--out", out, "--no-progress"] + extra, capsys)
    assert rc == 2
    assert err.startswith("awpfast.landscape: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not os.path.exists(os.path.join(out, "landscape.json"))
    key = {"missing": "no such file", "text": "not a readable", "format": "not an awpfast-train",
           "weights": "do not fit", "range": "--alphas", "reversed": "start < stop", "directions": "--directions",
           "labels": "--labels", "eps": "--eps"}[case]
    assert key in err


def test_cli_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("AWPFAST_DEBUG", "1")
    with pytest.raises(UsageError):
        L.main([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")])


def test_cli_checkpoints_must_agree_on_the_threat_model(ckpts, tmp_path, capsys):
    d = torch.load(ckpts["at"], weights_only=False)
    d["args"] = dict(d["args"], eps=4 / 255)
    other = str(tmp_path / "eps4.pt")
    torch.save(d, other)
    base = [ckpts["at"], other, "--out", str(tmp_path / "o"), "--no-progress", "--no-plot", "--alphas", "0,1",
            "--directions", "1", "--samples", "4", "--attack-steps", "1"]
    rc, _, err = _cli(base, capsys)
    assert rc == 2 and "disagree on --eps" in err
    rc, _, err = _cli(base + ["--eps", "2/255"], capsys)
    assert rc == 0, err
    doc = json.load(open(tmp_path / "o" / "landscape.json"))
    assert abs(doc["attack"]["eps"] - 2 / 255) < 1e-15 and abs(doc["attack"]["step"] - 0.5 / 255) < 1e-15
    # equal labels are told apart by their run folder or path
    assert len({r["label"] for r in doc["checkpoints"]}) == 2


def test_buffers_restored_and_warned_when_a_custom_attack_uses_train_mode():
    m = _model(13)
    x, y = _data(8)
    snap = _snapshot(m)
    inner = PGD(m, steps=1)

    def sneaky(xb, yb):  # a reference-style train-mode attack without PGD's bn_train flag
        was = m.training
        m.train()
        with torch.no_grad():
            m(xb)
        m.train(was)
        return inner(xb, yb)

    with pytest.warns(RuntimeWarning, match="buffer"):
        L.weight_landscape(m, x, y, [0.5], attack=sneaky)
    assert _bitwise_equal(m, snap)


# ----------------------------------------------------------------------------- the CLI's user review
def _exit_status(argv, capsys):
    """(status, stdout, stderr) of ``L.main``, also where an older main let argparse raise SystemExit."""
    try:
        rc = L.main(argv)
    except SystemExit as e:
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_missing_out_is_one_line_naming_the_fix(ckpts, capsys, monkeypatch):
    monkeypatch.delenv("AWPFAST_DEBUG", raising=False)
    rc, _, err = _exit_status([ckpts["at"], "--no-progress"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "usage:" not in err, err  # the old parser dumped its usage
    assert err.startswith("awpfast.landscape: error: --out DIR is missing") and "e.g." in err and "--out runs/" in err


def _help_entries(text):
    """``{option: its help text, continuation lines joined}`` from ``--help``."""
    entries, cur = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            cur = line.split()[0].rstrip(",")
            entries[cur] = line
        elif cur is not None and line.startswith("     "):
            entries[cur] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_cli_help_shows_each_default_once_and_out_as_required(capsys):
    rc, text, _ = _exit_status(["--help"], capsys)
    assert rc == 0
    entries = _help_entries(text)
    assert {"--eps", "--attack-step", "--norm", "--out", "--batch-size", "--alphas"} <= set(entries)
    for opt, entry in entries.items():
        assert entry.count("(default") <= 1, entry  # the old help: "(default: eps/4) (default: None)"
        assert "(default: None)" not in entry, entry
    assert "required" in entries["--out"] and "default" not in entries["--out"]
    assert "(default: 256)" in entries["--batch-size"] and "(default: -1:1:21)" in entries["--alphas"]
    assert "--out DIR" in text.split("options:")[0]  # the usage line shows --out, without brackets
    assert "[--out" not in text


def test_cli_never_advises_an_option_it_does_not_have(ckpts, tmp_path, capsys, monkeypatch):
    """Checkpoints of two data sets: the old advice was 'pass --data', which this command does not have
    (argparse then took --data for --data-dir)."""
    monkeypatch.delenv("AWPFAST_DEBUG", raising=False)
    d = torch.load(ckpts["at"], weights_only=False)
    d["args"] = dict(d["args"], data="digits")
    other = str(tmp_path / "digits.pt")
    torch.save(d, other)
    rc, _, err = _exit_status([ckpts["at"], other, "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert "different data sets" in err and "compare checkpoints of one data set" in err
    options = {s for a in L.build_parser()._actions for s in a.option_strings}
    assert "--data" not in options and "pass --data" not in err
    for flag in re.findall(r"pass (--[\w-]+)", err):
        assert flag in options, f"{flag} is advised but is not an option: {err}"


def test_cli_refuses_abbreviated_options(ckpts, tmp_path, capsys):
    out = str(tmp_path / "o")
    tiny = [ckpts["at"], "--out", out, "--alphas", "0", "--directions", "1", "--samples", "2", "--attack-steps", "0",
            "--no-plot", "--no-progress"]
    for abbrev, value in (("--data", str(tmp_path)), ("--data-d", str(tmp_path)), ("--overw", None)):
        rc, _, err = _exit_status(tiny + [abbrev] + ([value] if value else []), capsys)
        assert rc == 2 and f"unrecognized arguments: {abbrev}" in err, (abbrev, rc, err)
        assert not os.path.exists(os.path.join(out, "landscape.json"))  # the old parser ran with --data-dir
