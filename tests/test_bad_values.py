"""Values that used to do the wrong thing silently, and a new user's rough edges: each is refused
up front with one line naming the problem and the fix, or said once."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import awpfast
from awpfast import evaluate as E
from awpfast import train as T
from awpfast.attacks import PGD, TRADESAttack

TINY = ["--data", "synthetic", "--image-size", "8", "--model", "small-cnn", "--width", "4",
        "--batch-size", "64", "--attack-steps", "1", "--eval-steps", "1", "--eval-samples", "32",
        "--train-eval-samples", "32", "--train-samples", "64", "--val-samples", "32", "--no-progress",
        "--no-plot", "--quiet"]


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- sizes that wipe the weights
@pytest.mark.parametrize("kw,msg", [({"gamma": 1e30}, "gamma must be a finite number >= 0 and <= 1"),
                                    ({"gamma": 1.5}, "above 1 it swamps the weights"),
                                    ({"steps": 3, "step_size": 2.0}, "step_size must be a number > 0 and <= 1")])
def test_awp_sizes_that_swamp_the_weights_are_refused(kw, msg):
    m = net()
    with pytest.raises(ValueError, match=msg):
        awpfast.AWP(torch.optim.SGD(m.parameters(), lr=0.1), m, **kw)


def test_awp_gamma_one_keeps_the_weights_exact():
    m = net()
    w0 = [p.detach().clone() for p in m.parameters()]
    awp = awpfast.AWP(torch.optim.SGD(m.parameters(), lr=0.0), m, gamma=1.0, restore="before_step")
    x, y = batch()
    awp.perturb(lambda: F.cross_entropy(m(x), y))
    awp.zero_grad()
    F.cross_entropy(m(x), y).backward()
    awp.step()
    assert all(torch.equal(a, b) for a, b in zip(w0, m.parameters()))


@pytest.mark.parametrize("rho", [1e38, 101.0])
def test_sam_rho_that_breaks_the_weights_is_refused(rho):
    m = net()
    with pytest.raises(ValueError, match="rho must be <= 100"):
        awpfast.SAM(torch.optim.SGD(m.parameters(), lr=0.1), m, rho=rho)
    sam = awpfast.SAM(torch.optim.SGD(m.parameters(), lr=0.1), m)
    with pytest.raises(ValueError, match="rho must be <= 100"):
        sam.set_rho(rho)


def test_the_non_finite_warning_names_the_rule():
    m = net()
    sam = awpfast.SAM(torch.optim.SGD(m.parameters(), lr=0.1), m)
    x, y = batch()
    with pytest.warns(RuntimeWarning, match=r"^SAM: the ascent gradient is not finite"):
        assert sam.perturb(lambda: F.cross_entropy(m(x), y) * float("inf")) is False


# ----------------------------------------------------------------------------- the wrapper's inputs
@pytest.mark.parametrize("sd,msg", [({"state": "x", "param_groups": "y"}, "'state' must be a dict"),
                                    ({"state": {}, "param_groups": ["a"]}, "'param_groups' must be a list of dicts"),
                                    ({"state": {}, "param_groups": [{"params": [0, 1, 2, 3]}], "awpfast": "z"},
                                     "'awpfast' entry must be a dict")])
def test_load_state_dict_with_garbage_says_what_is_wrong(sd, msg):
    m = net()
    awp = awpfast.AWP(torch.optim.SGD(m.parameters(), lr=0.1), m)
    with pytest.raises(ValueError, match=msg):
        awp.load_state_dict(sd)


def test_meta_parameters_are_refused_when_the_wrapper_is_built():
    m = net()
    with torch.device("meta"):
        m[3] = nn.Linear(4 * 6 * 6, 5)
    with pytest.raises(ValueError, match="meta device"):
        awpfast.AWP(torch.optim.SGD(m.parameters(), lr=0.1), m)


def test_a_closure_that_calls_backward_gets_advice():
    m = net()
    awp = awpfast.AWP(torch.optim.SGD(m.parameters(), lr=0.1), m)
    x, y = batch()

    def torch_optim_style():
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="called backward\\(\\) itself.*only returns the loss"):
        awp.perturb(torch_optim_style)
    assert not awp.is_perturbed


def test_optimizer_parameters_outside_the_model_are_named_once():
    m = net()
    extra = nn.Parameter(torch.zeros(7, 2))
    with pytest.warns(UserWarning, match=r"1 parameter\(s\) that are not in the model \(shapes \(7, 2\)\)"):
        awpfast.AWP(torch.optim.SGD(list(m.parameters()) + [extra], lr=0.1), m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        awpfast.AWP(torch.optim.SGD(m.parameters(), lr=0.1), m)


# ----------------------------------------------------------------------------- attacks
def test_pgd_steps_must_be_an_integer_and_the_model_given():
    m = net()
    with pytest.raises(ValueError, match="steps must be an integer"):
        PGD(m, steps=2.5)
    with pytest.raises(TypeError, match="needs the model to attack"):
        PGD(None, eps=0.1)
    with pytest.raises(TypeError, match="needs the model to attack"):
        TRADESAttack(None)


# ----------------------------------------------------------------------------- awpfast-train
def test_warmups_longer_than_the_run_are_refused_when_given(tmp_path, capsys):
    assert T.main(TINY + ["--epochs", "3", "--awp-warmup", "3", "--out", str(tmp_path / "a")]) == 2
    assert "AWP would never switch on" in one_line(capsys)
    assert T.main(TINY + ["--epochs", "3", "--eps-warmup", "4", "--out", str(tmp_path / "b")]) == 2
    assert "never reach --eps" in one_line(capsys)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_a_default_warmup_longer_than_the_run_is_said(tmp_path, capsys):
    assert T.main(TINY + ["--method", "trades", "--epochs", "1", "--out", str(tmp_path / "t")]) == 0
    err = capsys.readouterr().err
    assert "note: --awp-warmup 10 with --epochs 1: AWP would never switch on" in err


def test_more_training_samples_than_the_data_has_are_refused(tmp_path, capsys):
    argv = list(TINY)
    argv[argv.index("--train-samples") + 1] = "100000"
    assert T.main(argv + ["--out", str(tmp_path / "a")]) == 2
    assert "--train-samples 100000 is more than the" in one_line(capsys)


def test_attack_sourced_ascent_with_several_steps_is_refused_up_front(tmp_path, capsys):
    assert T.main(TINY + ["--awp-ascent", "attack", "--awp-steps", "3", "--out", str(tmp_path / "a")]) == 2
    assert "--awp-steps 1" in one_line(capsys)
    assert not os.path.exists(tmp_path / "a")


def test_the_start_line_shows_the_ascent_and_the_extra_data(tmp_path, capsys):
    import numpy as np
    npz = tmp_path / "gen.npz"
    np.savez(npz, image=np.random.RandomState(0).randint(0, 255, (40, 8, 8, 3), dtype=np.uint8),
             label=np.arange(40) % 10)
    argv = [a for a in TINY if a != "--quiet"]
    assert T.main(argv + ["--epochs", "2", "--awp-warmup", "1", "--awp-ascent-fraction", "0.5", "--extra-data",
                          str(npz), "--out", str(tmp_path / "r"), "--stop-after", "1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "AWP(gamma=0.01, ascent separate on 0.5 of the batch) from epoch 2" in first
    assert "[extra data gen.npz, 0.5 of each batch]" in first


def test_evaluate_says_when_the_image_size_is_not_the_trained_one(tmp_path, capsys):
    out = tmp_path / "r"
    assert T.main(TINY + ["--epochs", "1", "--out", str(out)]) == 0
    assert E.main([str(out / "last.pt"), "--image-size", "16", "--steps", "1", "--samples", "8",
                   "--no-autoattack"]) == 0
    cap = capsys.readouterr()
    assert "trained on 8x8 images; --image-size 16 evaluates it on 16x16" in cap.err
    assert "seed 0 (PGD random starts)" in cap.out


# ----------------------------------------------------------------------------- every CLI
@pytest.mark.parametrize("module", ["awpfast.train", "awpfast.evaluate", "awpfast.landscape", "awpfast.continual.run",
                                    "awpfast.demo"])
def test_every_cli_has_version(module, capsys):
    import importlib
    main = importlib.import_module(module).main
    try:
        code = main(["--version"])
    except SystemExit as e:  # argparse's version action exits
        code = e.code
    assert code in (0, None) and f"awpfast {awpfast.__version__}" in capsys.readouterr().out


def test_abbreviated_options_are_not_guessed(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        T.main(TINY + ["--label-nois", "0.2", "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "unrecognized arguments: --label-nois" in capsys.readouterr().err


def test_the_synthetic_cifar10_writer_feeds_the_cifar10_path(tmp_path):
    from awpfast.data import load_dataset, write_synthetic_cifar10
    folder = write_synthetic_cifar10(str(tmp_path), train_per_class=3, test_per_class=2)
    assert folder.endswith("cifar-10-batches-py")
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.train.x.shape == (30, 3, 32, 32) and len(ds.test) == 20
    assert sorted(ds.train.y.tolist()) == sorted(list(range(10)) * 3)
