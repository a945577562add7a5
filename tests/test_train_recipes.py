"""The reference recipes as ``awpfast-train --recipe`` presets, trajectory fidelity through
``awpfast.train``'s own step code, ``--label-noise`` and ``--track-flatness``.

* Trajectory fidelity (float64, ``--dtype float64``): 3 training steps of ``train.train_epoch`` (the
  real loop: loader, attack, AWP, loss, forward order, schedule) under ``--recipe at-awp-reference``
  and ``--recipe trades-awp-reference`` equal the port of the reference loop in
  ``test_train_reference_port.py`` (proxy model, state-dict copy, the reference attacks) to 1e-10, weights
  and BatchNorm statistics; with our own forward order they do not.
* The presets resolve to the reference scripts' values, explicit options override them, args.json
  records the resolved values and the overrides.
* ``--track-flatness`` leaves the trajectory bitwise unchanged and logs the number that
  ``awpfast.landscape.flatness`` gives on the saved weights; under torchrun (DDP) too.
"""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from awpfast import landscape as L
from awpfast import train as T
from awpfast import cli as cli_
from awpfast import data as data_
from awpfast import models as models_
from awpfast.train import loop as loop_
from awpfast.train import report as report_
from awpfast.attacks import TRADESAttack
from awpfast.data import Split, load_dataset
from test_train_reference_port import port_at, port_trades

TOL = 1e-10
STEPS = 3  # training steps of the fidelity tests (batches of 8)
FIDELITY = ["--data", "synthetic", "--image-size", "8", "--model", "small-cnn", "--width", "4", "--batch-size", "8",
            "--train-samples", str(8 * STEPS), "--val-samples", "0", "--attack-steps", "3", "--dtype", "float64",
            "--quiet", "--no-progress", "--no-plot"]
TINY = ["--data", "synthetic", "--image-size", "8", "--model", "small-cnn", "--width", "4", "--batch-size", "64",
        "--attack-steps", "1", "--eval-steps", "1", "--eval-samples", "32", "--train-eval-samples", "32",
        "--train-samples", "128", "--val-samples", "32", "--no-progress", "--quiet"]
TIME_KEYS = ("train_time_s", "eval_time_s", "img_per_s", "flatness_time_s")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def _cfg(argv):
    parser = T.build_parser()
    return T.make_config(parser.parse_args(argv), cli_.explicit_options(parser, argv))


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ============================================================================ trajectory fidelity
def _run_train_and_port(argv, epoch, port):
    """``train_epoch(t, epoch)`` on a fresh trainer, then ``port(model, batches)`` from the same start,
    the same batches and the same global RNG state; returns (trainer, port model, start model)."""
    t = loop_.setup(_cfg(argv))
    start = copy.deepcopy(t.model)
    state = t.batches.generator.get_state()
    batches = [(x.double(), y) for x, y in t.batches]
    t.batches.generator.set_state(state)
    assert len(batches) == STEPS
    rng = torch.get_rng_state()
    loop_.train_epoch(t, epoch)
    torch.set_rng_state(rng)
    ref = copy.deepcopy(start)
    port(ref, batches)
    return t, ref, start


def _diffs(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return {k: float((sa[k].double() - sb[k].double()).abs().max()) for k in sa}


def _assert_same(t, ref, start):
    d = _diffs(t.model, ref)
    worst = max(d, key=d.get)
    assert d[worst] <= TOL, f"{worst} differs by {d[worst]:.3g}"
    moved = _diffs(t.model, start)  # not vacuous: weights and BN statistics moved
    assert max(v for k, v in moved.items() if "running_mean" in k) > 1e-3
    assert max(v for k, v in moved.items() if k.endswith("weight")) > 1e-3
    assert all(p.dtype == torch.float64 for p in t.model.parameters())


def _at_port(gamma):
    return lambda m, b: port_at(m, b, gamma, "reference", eps=8 / 255, alpha=2 / 255, steps=3, reseed=False)


def _trades_port(gamma):
    return lambda m, b: port_trades(m, b, gamma, "reference", attack="reference", eps=8 / 255, alpha=2 / 255,
                                    steps=3, reseed=False)


def test_at_awp_reference_recipe_steps_through_train_equal_the_reference_port(tmp_path):
    argv = FIDELITY + ["--recipe", "at-awp-reference", "--out", str(tmp_path / "r")]
    t, ref, start = _run_train_and_port(argv, 0, _at_port(0.01))
    a = t.cfg.args
    assert (a.attack_bn, a.forward_order, a.input_norm, a.pad_mode, a.augment) == \
        ("train", "reference", "cifar10", "reflect", "crop+flip")
    assert t.awp.param_groups[0]["awp_gamma"] == 0.01
    _assert_same(t, ref, start)
    # our forward order (no extra train-mode forwards) lands elsewhere: the comparison sees the BN feeding
    t2, ref2, _ = _run_train_and_port(argv + ["--forward-order", "ours", "--overwrite"], 0, _at_port(0.01))
    assert max(v for k, v in _diffs(t2.model, ref2).items() if "running" in k) > 1e-6


def test_trades_awp_reference_recipe_steps_through_train_equal_the_reference_port(tmp_path):
    """Epoch index 9 (1-based 10) is the first with AWP under the recipe, as in the reference."""
    argv = FIDELITY + ["--recipe", "trades-awp-reference", "--out", str(tmp_path / "r")]
    t, ref, start = _run_train_and_port(argv, 9, _trades_port(0.005))
    a = t.cfg.args
    assert (a.attack_bn, a.forward_order, a.input_norm, a.pad_mode, a.lr_schedule, a.awp_warmup) == \
        ("eval", "reference", "none", "zeros", "piecewise-epoch", 9)
    assert t.awp.param_groups[0]["awp_gamma"] == 0.005
    o = t.cfg.options  # the typed options the loop reads
    assert o.method.awp_warmup == 9 and o.attack.bn == "eval"
    assert loop_.epoch_gamma(o, 8) == 0.0 and loop_.epoch_gamma(o, 9) == 0.005
    _assert_same(t, ref, start)
    t2, ref2, _ = _run_train_and_port(argv + ["--forward-order", "ours"], 9, _trades_port(0.005))
    assert max(v for k, v in _diffs(t2.model, ref2).items() if "running" in k) > 1e-6


# ============================================================================ presets
def test_recipes_resolve_to_the_reference_values_and_explicit_options_win(tmp_path):
    out = str(tmp_path / "o")
    a = _cfg(["--recipe", "at-awp-reference", "--data-dir", str(tmp_path), "--out", out]).args
    assert (a.method, a.model, a.data, a.epochs, a.batch_size, a.lr, a.lr_schedule, a.momentum, a.weight_decay) == \
        ("at", "preact18", "cifar10", 200, 128, 0.1, "piecewise", 0.9, 5e-4)
    assert (a.awp_gamma, a.awp_warmup, a.awp_restore, a.attack_steps, a.eval_steps) == \
        (0.01, 0, "after_step", 10, 20)
    assert a.eps == 8 / 255 and a.alpha == 2 / 255 and a.norm == "Linf"
    a = _cfg(["--recipe", "at-awp-reference", "--norm", "L2", "--data-dir", str(tmp_path), "--out", out]).args
    assert a.eps == 128 / 255 and a.alpha == 15 / 255
    a = _cfg(["--recipe", "trades-awp-reference", "--data-dir", str(tmp_path), "--out", out]).args
    assert (a.method, a.model, a.beta, a.awp_gamma, a.awp_warmup, a.lr_schedule, a.attack_bn, a.input_norm,
            a.pad_mode) == ("trades", "wrn34-10", 6.0, 0.005, 9, "piecewise-epoch", "eval", "none", "zeros")
    a = _cfg(["--recipe", "trades-awp-reference", "--norm", "L2", "--eps", "0.5", "--attack-steps", "5",
              "--data-dir", str(tmp_path), "--out", out]).args
    assert a.eps == 0.5 and a.alpha == pytest.approx(2 * 0.5 / 5) and a.trades_l2_order == "clamp-renorm"
    a = _cfg(["--recipe", "trades-reference", "--data-dir", str(tmp_path), "--out", out]).args
    assert a.awp_gamma == 0.0 and a.method == "trades"
    # without a recipe: our defaults
    a = _cfg(["--out", out]).args
    assert (a.epochs, a.forward_order, a.attack_bn, a.lr_schedule, a.trades_l2_order) == \
        (30, "ours", "eval", "piecewise", "renorm-clamp")


def test_recipe_run_records_resolved_values_and_overrides(tmp_path):
    out = str(tmp_path / "run")
    assert T.main(TINY + ["--recipe", "trades-awp-reference", "--epochs", "1", "--eval-steps", "1",
                          "--out", out, "--no-plot"]) == 0
    rec = json.load(open(os.path.join(out, "args.json")))
    assert rec["recipe"] == "trades-awp-reference" and rec["lr_schedule"] == "piecewise-epoch"
    assert rec["awp_warmup"] == 9 and rec["forward_order"] == "reference" and rec["augment"] == "crop+flip"
    ov = rec["recipe_overrides"]
    assert ov["epochs"] == [1, 200] and ov["model"] == ["small-cnn", "wrn34-10"] and ov["data"][1] == "cifar10"
    assert "lr" not in ov and "beta" not in ov and "eps" not in ov
    assert _metrics(out)[0]["awp_gamma"] == 0.0  # warm-up: 9 epochs without AWP


def test_recipe_errors_are_one_line(tmp_path, capsys):
    assert T.main(["--recipe", "at-awp-reference", "--method", "trades", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "at recipe" in err and "trades-awp-reference" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert T.main(["--recipe", "at-awp-reference", "--out", str(tmp_path / "x")]) == 2  # cifar10 needs --data-dir
    assert "--data-dir" in capsys.readouterr().err
    assert T.main(TINY + ["--method", "mart", "--forward-order", "reference", "--out", str(tmp_path / "x")]) == 2
    assert "--forward-order" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_piecewise_epoch_schedule_decays_for_whole_epochs():
    """The TRADES reference sets the LR once per 1-based epoch: x0.1 from epoch 100, x0.01 from 150 (of 200).
    The per-iteration schedule reaches x0.1 only at the last iteration of epoch 100."""
    n, epochs = 7, 200
    for k in range(95 * n, 152 * n):  # iteration k (0-based) of the run: 1-based epoch k // n + 1
        e = k // n + 1
        want = 1.0 if e < 100 else (0.1 if e < 150 else 0.01)
        assert loop_.lr_factor("piecewise-epoch", (k + 1) / n, epochs) == want, k
    assert loop_.lr_factor("piecewise", (99 * n + 1) / n, epochs) == 1.0  # epoch 100, first iteration
    assert loop_.lr_factor("piecewise", 100.0, epochs) == 0.1  # ... its last
    # 4 epochs: 1-based epoch 2 = E/2 at x0.1, epoch 3 = 3E/4 at x0.01 (the reference's ">=")
    assert [loop_.lr_factor("piecewise-epoch", e + 1 / n, 4) for e in range(4)] == [1.0, 0.1, 0.01, 0.01]


# ============================================================================ the TRADES L2 attack
def _ref_trades_l2(model, x, eps, steps):
    """The TRADES reference's L2 attack, written from its description: SGD on ``delta`` with
    lr = 2 eps / steps on -KL, the gradient divided by its per-sample norm, then clamp, then renorm."""
    model.eval()
    delta = (0.001 * torch.randn_like(x)).requires_grad_(True)
    opt = torch.optim.SGD([delta], lr=eps / steps * 2)
    for _ in range(steps):
        opt.zero_grad()
        loss = -F.kl_div(F.log_softmax(model(x + delta), dim=1), F.softmax(model(x), dim=1), reduction="sum")
        loss.backward()
        n = delta.grad.view(len(x), -1).norm(p=2, dim=1)
        delta.grad.div_(n.view(-1, 1, 1, 1))
        opt.step()
        delta.data.add_(x)
        delta.data.clamp_(0, 1).sub_(x)
        delta.data.renorm_(p=2, dim=0, maxnorm=eps)
    return (x + delta).detach()


def test_trades_l2_clamp_renorm_equals_the_reference_attack():
    torch.manual_seed(3)
    model = models_.build_model("small-cnn", 10, 3, width=4).double().eval()
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64)
    x[:3] = (x[:3] > 0.5).double()  # images at the box's faces: clamp and renorm do not commute there
    eps, steps = 128 / 255, 4
    torch.manual_seed(9)
    ref = _ref_trades_l2(model, x, eps, steps)
    torch.manual_seed(9)
    ours = TRADESAttack(model, eps=eps, alpha=2 * eps / steps, steps=steps, norm="L2", l2_order="clamp-renorm")(x)
    assert torch.isfinite(ours).all()
    assert float((ours - ref).abs().max()) <= TOL
    assert float((ours - x).reshape(6, -1).norm(dim=1).max()) <= eps * (1 + 1e-6)
    assert float(ours.min()) >= 0 and float(ours.max()) <= 1
    torch.manual_seed(9)
    other = TRADESAttack(model, eps=eps, alpha=2 * eps / steps, steps=steps, norm="L2")(x)
    assert float((other - ref).abs().max()) > 1e-6  # the order matters on these images
    with pytest.raises(ValueError, match="l2_order"):
        TRADESAttack(model, norm="L2", l2_order="sideways")


# ============================================================================ label noise
def test_label_noise_is_exact_fixed_and_only_on_the_training_images():
    ds = load_dataset("synthetic", image_size=4)
    clean_train, clean_val = data_.training_splits(ds, 100, None)
    train, val = data_.training_splits(ds, 100, None, label_noise=0.3)
    assert torch.equal(val.y, clean_val.y) and torch.equal(val.x, clean_val.x)  # validation untouched
    assert torch.equal(train.x, clean_train.x)
    flipped = train.y != clean_train.y
    assert int(flipped.sum()) == round(0.3 * len(train))  # exactly the fraction, never to the same class
    again, _ = data_.training_splits(ds, 100, None, label_noise=0.3)
    assert torch.equal(again.y, train.y)  # seeded: the same labels every time (every epoch, seed, arm)
    # uniform over the other classes: on 20k labels the shift (new - old) mod 10 covers 1..9 within 10 %
    y0 = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    y1 = data_.symmetric_label_noise(Split(torch.zeros(20000, 1), y0), 0.5, 10).y
    counts = torch.bincount((y1 - y0) % 10, minlength=10)
    assert counts[0] == 10000 and (counts[1:] - 10000 / 9).abs().max() < 0.1 * 10000 / 9
    assert data_.symmetric_label_noise(Split(train.x[:0], train.y[:0]), 0.5, 10).y.numel() == 0
    y = torch.arange(10).repeat(10)
    assert data_.symmetric_label_noise(Split(torch.zeros(100, 1), y), 0.0, 10).y is y


def test_label_noise_cli(tmp_path, capsys):
    assert T.main(TINY + ["--label-noise", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "--label-noise" in capsys.readouterr().err
    out = str(tmp_path / "n")
    assert T.main(TINY + ["--label-noise", "0.25", "--epochs", "1", "--out", out, "--no-plot"]) == 0
    assert json.load(open(os.path.join(out, "args.json")))["label_noise"] == 0.25


# ============================================================================ flatness tracking
def test_track_flatness_keeps_the_trajectory_and_logs_the_landscape_number(tmp_path):
    common = TINY + ["--epochs", "2", "--seed", "4", "--attack-bn", "train", "--no-plot", "--train-samples", "64"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert T.main(common + ["--out", a]) == 0
    flat = ["--track-flatness", "--flatness-samples", "40", "--flatness-directions", "2", "--flatness-steps", "2",
            "--flatness-alpha", "0.25"]
    assert T.main(common + flat + ["--out", b]) == 0
    ca = torch.load(os.path.join(a, "last.pt"), weights_only=False)
    cb = torch.load(os.path.join(b, "last.pt"), weights_only=False)
    for k, v in ca["model"].items():  # weights and BN statistics bitwise equal
        assert torch.equal(v, cb["model"][k]), k
    for i, st in ca["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], cb["optimizer"]["state"][i]["momentum_buffer"])
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])
    ra, rb = _metrics(a), _metrics(b)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIME_KEYS and "flatness" not in k}  # noqa: E731
                          for r in rows]
    assert strip(ra) == strip(rb)
    assert all(math.isfinite(r["flatness"]) and r["flatness_loss0"] > 0 for r in rb)
    # the logged number is landscape.flatness of the saved weights on the held-out validation images
    # (--flatness-split val, the default: 32 of them, fewer than --flatness-samples 40), not the training ones
    model = models_.build_model("small-cnn", 10, 3, 4)
    model.load_state_dict(cb["model"])
    train, val = data_.training_splits(load_dataset("synthetic", image_size=8), 32, 64)
    assert len(val) == 32
    from awpfast.attacks import PGD
    attack = PGD(model, eps=8 / 255, alpha=2 / 255, steps=2)
    want = L.flatness(model, val.x[:40], val.y[:40], 0.25, 2, attack, seed=loop_.FLATNESS_SEED, details=True)
    assert rb[-1]["flatness"] == pytest.approx(want["flatness"], abs=1e-12)
    assert rb[-1]["flatness_loss0"] == pytest.approx(want["loss0"], abs=1e-12)
    on_train = L.flatness(model, train.x[:40], train.y[:40], 0.25, 2, attack, seed=loop_.FLATNESS_SEED, details=True)
    assert on_train["loss0"] != pytest.approx(want["loss0"], abs=1e-9)
    # metrics.png gets the flatness panel (plotting works with the flatness keys present)
    assert report_.plot_metrics(rb, str(tmp_path / "m.png")) and os.path.getsize(tmp_path / "m.png") > 1000


def test_track_flatness_split_train_uses_the_noisy_training_labels(tmp_path):
    """--flatness-split train keeps the behaviour before the option: the first training images with
    the labels the run trained on (--label-noise included)."""
    out = str(tmp_path / "t")
    argv = TINY + ["--epochs", "1", "--seed", "2", "--no-plot", "--train-samples", "64", "--label-noise", "0.5",
                   "--track-flatness", "--flatness-samples", "24", "--flatness-directions", "1",
                   "--flatness-steps", "1", "--flatness-split", "train", "--out", out]
    assert T.main(argv) == 0
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    assert ck["args"]["flatness_split"] == "train"
    model = models_.build_model("small-cnn", 10, 3, 4)
    model.load_state_dict(ck["model"])
    clean, _ = data_.training_splits(load_dataset("synthetic", image_size=8), 32, 64)
    train, _ = data_.training_splits(load_dataset("synthetic", image_size=8), 32, 64, 0.5)
    assert not torch.equal(train.y[:24], clean.y[:24])  # some of the 24 carry flipped labels
    from awpfast.attacks import PGD
    want = L.flatness(model, train.x[:24], train.y[:24], 0.5, 1, PGD(model, eps=8 / 255, alpha=2 / 255, steps=1),
                      seed=loop_.FLATNESS_SEED)
    assert _metrics(out)[-1]["flatness"] == pytest.approx(want, abs=1e-12)
    from awpfast.train import config as C
    assert C.DEFAULTS["flatness_split"] == "val" and "flatness_split" in C._RUN_KEYS


def test_track_flatness_bad_values(tmp_path, capsys):
    assert T.main(TINY + ["--track-flatness", "--val-samples", "0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--flatness-split train" in err and "Traceback" not in err
    for bad in (["--flatness-alpha", "0"], ["--flatness-directions", "0"], ["--flatness-samples", "-1"],
                ["--flatness-alpha", "nan"]):
        assert T.main(TINY + ["--track-flatness", "--out", str(tmp_path / "x")] + bad) == 2
        err = capsys.readouterr().err
        assert bad[0] in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "x")


needs_dist = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")


@needs_dist
def test_track_flatness_under_torchrun_ddp(tmp_path):
    """Rank 0 computes the number on its replica (rank 0's BN statistics, as the evaluation) and
    broadcasts it; the run finishes (no rank waits forever) and the logged number is the one-process
    flatness of the saved weights. One torchrun launch (about 20 s on the loaded 2-core machine)."""
    from test_train_distributed import _torchrun
    out = tmp_path / "run"
    args = ["--data", "synthetic", "--image-size", "8", "--model", "small-cnn", "--width", "4", "--batch-size", "32",
            "--attack-steps", "1", "--eval-steps", "1", "--eval-samples", "16", "--train-eval-samples", "16",
            "--train-samples", "64", "--val-samples", "16", "--no-plot", "--epochs", "2", "--out", str(out),
            "--track-flatness", "--flatness-samples", "24", "--flatness-directions", "2", "--flatness-steps", "1"]
    p, _ = _torchrun(args, tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "x 2 (ddp)" in p.stdout and p.stdout.count("flatness ") == 2  # rank 0 prints each epoch once
    rows = _metrics(str(out))
    ck = torch.load(out / "last.pt", weights_only=False)
    model = models_.build_model("small-cnn", 10, 3, 4)
    model.load_state_dict(ck["model"])
    _, val = data_.training_splits(load_dataset("synthetic", image_size=8), 16, 64)
    from awpfast.attacks import PGD
    want = L.flatness(model, val.x[:24], val.y[:24], 0.5, 2, PGD(model, eps=8 / 255, alpha=2 / 255, steps=1),
                      seed=loop_.FLATNESS_SEED)
    assert rows[-1]["flatness"] == pytest.approx(want, abs=1e-9)


# ============================================================================ eps warm-up
def test_eps_ramp_values():
    assert loop_.eps_ramp(0, 0.1) == 1.0 and loop_.eps_ramp(0, 50.0) == 1.0
    assert loop_.eps_ramp(4, 1.0) == 0.25 and loop_.eps_ramp(4, 4.0) == 1.0 and loop_.eps_ramp(4, 9.5) == 1.0
    assert loop_.eps_ramp(3, 0.5) == pytest.approx(1 / 6)


def test_eps_warmup_ramps_the_training_attack_only_and_resumes_exactly(tmp_path, capsys):
    """The training attack's radius at iteration i of epoch e is eps * min(1, (e + (i+1)/n) / N), seen in
    the adversarial examples it returns; the evaluation keeps the full eps; a run stopped inside the
    ramp and resumed ends bitwise equal to an uninterrupted one."""
    eps = 0.2
    argv = TINY + ["--eps", str(eps), "--eps-warmup", "2", "--epochs", "3", "--train-samples", "96",
                   "--batch-size", "32", "--attack-steps", "2", "--no-plot", "--seed", "3"]
    t = loop_.setup(_cfg(argv + ["--out", str(tmp_path / "probe")]))
    seen = []
    real = t.attack.forward

    def spy(x, y):
        x_adv = real(x, y)
        seen.append((t.attack.eps, t.attack.alpha, float((x_adv - x).abs().max())))
        return x_adv

    t.attack.forward = spy
    for e in range(3):
        rec = loop_.train_epoch(t, e)
        assert rec["train_eps"] == pytest.approx(eps * min(1.0, (e + 1) / 2))
    n = t.n_iter
    assert n == 3 and len(seen) == 3 * n
    for k, (r, a, moved) in enumerate(seen):
        e, i = divmod(k, n)
        want = eps * min(1.0, (e + (i + 1) / n) / 2)
        assert r == pytest.approx(want) and a == pytest.approx(want / 4)
        assert 0.8 * want < moved <= want + 1e-6  # the examples really lie in the ramped ball
    # the CLI: train_eps logged, the evaluation at the full eps, and an exact resume inside the ramp
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert T.main(argv + ["--out", full]) == 0
    assert T.main(argv + ["--out", part, "--stop-after", "1"]) == 0
    assert T.main(["--resume", "--out", part, "--quiet", "--no-plot"]) == 0
    rf, rp = _metrics(full), _metrics(part)
    assert [r["train_eps"] for r in rf] == pytest.approx([eps / 2, eps, eps])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]  # noqa: E731
    assert strip(rf) == strip(rp)
    ca = torch.load(os.path.join(full, "last.pt"), weights_only=False)
    cp = torch.load(os.path.join(part, "last.pt"), weights_only=False)
    assert all(torch.equal(v, cp["model"][k]) for k, v in ca["model"].items())
    # without the ramp the first epoch differs (the ramp is not a no-op)
    off = str(tmp_path / "off")
    assert T.main(argv + ["--eps-warmup", "0", "--out", off, "--epochs", "1"]) == 0
    assert _metrics(off)[0]["train_loss"] != rf[0]["train_loss"] and "train_eps" not in _metrics(off)[0]
    capsys.readouterr()
    assert T.main(argv + ["--eps-warmup", "-1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--eps-warmup" in err and "Traceback" not in err and not os.path.exists(tmp_path / "bad")


# ============================================================================ sparse evaluation
def test_eval_every_evaluates_test_on_schedule_and_at_every_new_validation_best(tmp_path, capsys):
    out = str(tmp_path / "r")
    argv = TINY + ["--epochs", "7", "--eval-every", "3", "--out", out, "--track-flatness", "--flatness-samples", "16",
                   "--flatness-directions", "1", "--flatness-steps", "1", "--lr", "0.05"]
    assert T.main(argv) == 0
    rows = _metrics(out)
    best = None
    for r in rows:
        assert r["val_robust_acc"] is not None  # the validation split every epoch
        new_best = best is None or r["val_robust_acc"] > best
        due = r["epoch"] % 3 == 0 or r["epoch"] == 7
        has_test = r["test_robust_acc"] is not None
        assert has_test == (due or new_best), r
        assert (r["train_robust_acc"] is not None) == has_test and (r["test_clean_loss"] is not None) == has_test
        assert (r.get("flatness") is not None) == due  # flatness on the schedule only
        best = r["val_robust_acc"] if new_best else best
    assert sum(r["test_robust_acc"] is None for r in rows) >= 1  # not vacuous: some epochs were skipped
    ck = torch.load(os.path.join(out, "best.pt"), weights_only=False)
    b = ck["best"]
    assert b["test_robust_acc"] is not None and b["val_robust_acc"] == max(r["val_robust_acc"] for r in rows)
    assert b["epoch"] == min(r["epoch"] for r in rows if r["val_robust_acc"] == b["val_robust_acc"])
    assert report_.plot_metrics(rows, str(tmp_path / "m.png")) and os.path.getsize(tmp_path / "m.png") > 1000
    capsys.readouterr()
    assert T.main(TINY + ["--eval-every", "0", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--eval-every" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- one entry per option
def test_each_option_is_one_table_entry():
    """The option table drives the parser (every flag, its default), the run keys (what --resume takes
    from the checkpoint) and the value checks, including ``choices`` for programmatic Namespaces."""
    import argparse
    from awpfast.train import config as C
    p = C.build_parser()
    dests = [a.dest for a in p._actions if a.dest not in ("help", "version")]
    assert dests == [o.dest for o in C.OPTIONS] and len(set(dests)) == len(dests)
    for a in p._actions:
        if a.dest in C.DEFAULTS:
            assert a.default == C.parser_default(a.dest)
    assert set(C._RUN_KEYS) == {o.dest for o in C.OPTIONS if o.run}
    assert "out" not in C._RUN_KEYS and "awp_every" in C._RUN_KEYS
    # a programmatic Namespace with a value outside an option's choices is refused in one line
    args = C.resolve_defaults(argparse.Namespace(method="madry"))
    with pytest.raises(C.UsageError, match=r"^--method must be one of at, trades, mart, got 'madry'$"):
        C.validate_args(args)
    args = C.resolve_defaults(argparse.Namespace(awp_every=0))
    with pytest.raises(C.UsageError, match=r"^--awp-every must be an integer >= 1, got 0$"):
        C.validate_args(args)
    # an option's check applies only where it means something (--rwp-lr without --awp-rule rwp)
    C.validate_args(C.resolve_defaults(argparse.Namespace(rwp_lr=-1.0)))
    with pytest.raises(C.UsageError, match="--rwp-lr must be a finite number > 0"):
        C.validate_args(C.resolve_defaults(argparse.Namespace(rwp_lr=-1.0, awp_rule="rwp")))
