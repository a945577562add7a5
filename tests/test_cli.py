"""The new-user walk through the CLIs: every point has a test here that fails on the
code before the fix (overwritten runs, tracebacks, silently accepted bad values, misleading
messages, --help, empty folders, --resume notes, non-TTY output, AutoAttack, recipe fidelity)."""
import hashlib
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch

from awpfast import evaluate as E
from awpfast import train as T
from awpfast import data as data_
from awpfast import errors as errors_
from awpfast import models as models_
from awpfast.train import loop as loop_

TINY = ["--data", "synthetic", "--image-size", "8", "--model", "small-cnn", "--width", "4",
        "--batch-size", "64", "--attack-steps", "1", "--eval-steps", "1", "--eval-samples", "32",
        "--train-eval-samples", "32", "--train-samples", "64", "--val-samples", "32", "--no-progress",
        "--no-plot", "--quiet"]


def _digest(folder):
    """name -> sha256 of every file in a folder (the run's files, to prove nothing changed)."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f == ".awpfast.lock":  # the run lock's holder record, not a file of the run
            continue
        with open(os.path.join(folder, f), "rb") as fh:
            out[f] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch run (read only: tests that write copy it)."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    assert T.main(TINY + ["--epochs", "1", "--out", out, "--seed", "1"]) == 0
    return out


def _err_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- 1. data loss
def test_rerun_into_finished_run_is_refused_and_changes_nothing(finished, capsys):
    before = _digest(finished)
    assert T.main(TINY + ["--epochs", "1", "--out", finished]) == 2
    err = _err_line(capsys)
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert _digest(finished) == before


def test_overwrite_replaces_the_run(finished, tmp_path, capsys):
    import shutil
    out = str(tmp_path / "copy")
    shutil.copytree(finished, out)
    old = _digest(out)
    with open(os.path.join(out, "metrics.png"), "wb") as f:  # a stale file of the old run
        f.write(b"old")
    assert T.main(TINY + ["--epochs", "1", "--out", out, "--seed", "9", "--overwrite"]) == 0
    new = _digest(out)
    assert new["last.pt"] != old["last.pt"] and new["metrics.jsonl"] != old["metrics.jsonl"]
    assert "metrics.png" not in new  # the old run's files went with it (--no-plot writes none)
    assert json.load(open(os.path.join(out, "args.json")))["seed"] == 9


@pytest.mark.parametrize("bad", [["--epochs", "-3"], ["--epochs", "0"], ["--train-samples", "0"],
                                 ["--eval-samples", "-1"], ["--eps", "inf"], ["--eps", "nan"], ["--lr", "0"],
                                 ["--batch-size", "0"], ["--awp-gamma", "-1"], ["--val-samples", "-2"]])
def test_bad_values_are_refused_before_anything_is_written(bad, finished, tmp_path, capsys):
    fresh = str(tmp_path / "fresh")
    assert T.main(TINY + ["--out", fresh] + bad) == 2
    err = _err_line(capsys)
    assert bad[0] in err and len(err.splitlines()) == 1
    assert not os.path.exists(fresh)  # no empty folder left behind
    before = _digest(finished)
    assert T.main(TINY + ["--out", finished] + bad) == 2  # the old code emptied metrics.jsonl on --epochs -3
    assert _digest(finished) == before


def test_unparseable_eps_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        T.main(TINY + ["--eps", "8/0"])
    assert e.value.code == 2
    err = _err_line(capsys)
    assert "--eps" in err and "divides by zero" in err and "usage:" not in err
    with pytest.raises(SystemExit):
        T.main(TINY + ["--eps", "eight"])
    assert "not a number" in _err_line(capsys)


# ----------------------------------------------------------------------------- 2. no tracebacks
def _bad_files(tmp_path, finished):
    with open(os.path.join(finished, "last.pt"), "rb") as f:
        blob = f.read()
    files = {"truncated": blob[: len(blob) // 3], "empty": b"", "text": b"hello, not a checkpoint\n",
             "pickle": pickle.dumps({"a": 1})}
    paths = {}
    for name, data in files.items():
        p = tmp_path / f"{name}.pt"
        p.write_bytes(data)
        paths[name] = str(p)
    paths["folder"] = str(tmp_path)
    paths["missing"] = str(tmp_path / "nope.pt")
    return paths


def test_broken_checkpoints_are_one_line_errors(finished, tmp_path, capsys):
    for name, path in _bad_files(tmp_path, finished).items():
        out = str(tmp_path / f"o-{name}")
        assert T.main(["--resume", path, "--out", out, "--quiet"]) == 2, name
        err = _err_line(capsys)
        assert path in err and len(err.splitlines()) == 1, err
        assert not os.path.exists(out)
        assert E.main([path, "--steps", "1"]) == 2, name
        err = _err_line(capsys)
        assert path in err and len(err.splitlines()) == 1, err


def test_device_and_out_errors(finished, tmp_path, capsys):
    if not torch.cuda.is_available():
        assert T.main(TINY + ["--device", "cuda", "--out", str(tmp_path / "c")]) == 2
        assert "CUDA is not available" in _err_line(capsys)
    assert T.main(TINY + ["--device", "gpu0", "--out", str(tmp_path / "c")]) == 2
    assert "not a device" in _err_line(capsys)
    assert not os.path.exists(tmp_path / "c")
    afile = os.path.join(finished, "args.json")
    before = _digest(finished)
    assert T.main(TINY + ["--out", afile]) == 2
    assert "existing file" in _err_line(capsys)
    assert _digest(finished) == before


def test_unexpected_failure_is_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("synthetic failure\nwith a second line")
    monkeypatch.setattr(loop_, "train_epoch", boom)  # the loop module calls it
    out = str(tmp_path / "r")
    assert T.main(TINY + ["--out", out]) == 1
    err = _err_line(capsys)
    assert err.startswith("awpfast-train: error: RuntimeError: synthetic failure with a second line")
    assert "AWPFAST_DEBUG" in err
    assert not os.path.exists(out)  # nothing was written: no folder left
    monkeypatch.setenv("AWPFAST_DEBUG", "1")
    with pytest.raises(RuntimeError, match="synthetic failure"):
        T.main(TINY + ["--out", out])


def test_evaluate_model_mismatch_is_named(finished, tmp_path, capsys):
    best = os.path.join(finished, "best.pt")
    assert E.main([best, "--model", "preact18", "--steps", "1"]) == 2
    err = _err_line(capsys)
    assert "small-cnn" in err and "preact18" in err and len(err) < 300
    # a bare state_dict: the mismatch is summarized and the right architecture suggested
    sd = str(tmp_path / "sd.pt")
    torch.save(torch.load(best, weights_only=False)["model"], sd)
    assert E.main([sd, "--model", "preact18", "--data", "synthetic", "--image-size", "8", "--steps", "1"]) == 2
    err = _err_line(capsys)
    assert "do not fit preact18" in err and "--model small-cnn" in err and len(err) < 400
    # the small-cnn width is read off the weights
    js = str(tmp_path / "sd.json")
    assert E.main([sd, "--model", "small-cnn", "--data", "synthetic", "--image-size", "8", "--steps", "1",
                   "--samples", "8", "--autoattack", "off", "--json", js]) == 0
    assert json.load(open(js))["n"] == 8


def test_evaluate_checks_json_target_before_evaluating(finished, tmp_path, capsys, monkeypatch):
    called = []
    monkeypatch.setattr(E, "evaluate_split", lambda *a, **k: called.append(1))
    best = os.path.join(finished, "best.pt")
    assert E.main([best, "--json", str(tmp_path / "no" / "dir" / "r.json")]) == 2
    assert "does not exist" in _err_line(capsys) and not called
    assert E.main([best, "--json", str(tmp_path)]) == 2
    assert "is a folder" in _err_line(capsys) and not called


# ----------------------------------------------------------------------------- 3. bad values
@pytest.mark.parametrize("bad", [["--samples", "0"], ["--samples", "-1"], ["--steps", "-1"], ["--batch-size", "0"],
                                 ["--eps", "inf"]])
def test_evaluate_refuses_bad_values(bad, finished, capsys):
    assert E.main([os.path.join(finished, "best.pt")] + bad) == 2
    err = _err_line(capsys)
    assert bad[0] in err


# ----------------------------------------------------------------------------- 4. messages
def _fake_cifar(root, n=20):
    from awpfast import data as D
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in D.CIFAR10_FILES:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(d, f)
    return root


def test_evaluate_other_dataset_does_not_blame_the_user(finished, tmp_path, capsys):
    root = _fake_cifar(str(tmp_path / "c"))
    js = str(tmp_path / "r.json")
    assert E.main([os.path.join(finished, "best.pt"), "--data", "cifar10", "--data-dir", root, "--steps", "1",
                   "--samples", "4", "--autoattack", "off", "--json", js]) == 0
    err = capsys.readouterr().err
    assert "--image-size" not in err and "trained on synthetic" in err
    assert json.load(open(js))["data"] == "cifar10"
    assert E.main([os.path.join(finished, "best.pt"), "--data", "cifar10", "--data-dir", root,
                   "--image-size", "16"]) == 2
    assert "drop --image-size 16" in _err_line(capsys)


# ----------------------------------------------------------------------------- should-fix items
@pytest.mark.parametrize("module", [T, E])
def test_help_shows_every_default_once(module):
    parser = module.build_parser()
    fmt = parser._get_formatter()
    text = parser.format_help()
    assert "(default: None)" not in text
    for act in parser._actions:
        if not act.option_strings or act.nargs == 0:  # positionals and flags have no default to show
            continue
        help_text = fmt._get_help_string(act) % dict(vars(act), prog=parser.prog)
        assert help_text.lower().count("default") == 1, (act.option_strings, help_text)
    if module is T:
        for opt, default in (("--model", "small-cnn"), ("--batch-size", "128"), ("--momentum", "0.9"),
                             ("--weight-decay", "0.0005")):
            act = next(a for a in parser._actions if opt in a.option_strings)
            assert f"(default: {default})" in fmt._get_help_string(act) % vars(act)


def test_rejected_run_leaves_no_folder(tmp_path, capsys):
    out = str(tmp_path / "a" / "b")
    # a setup failure (missing data) after validation: still nothing on disk
    assert T.main(["--data", "cifar10", "--data-dir", str(tmp_path / "nowhere"), "--out", out, "--quiet"]) == 2
    assert "data_batch_1" in _err_line(capsys)
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "a")


def test_resume_notes_are_plain_messages(finished, tmp_path, capsys):
    import shutil
    out = str(tmp_path / "r")
    shutil.copytree(finished, out)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert T.main(["--resume", os.path.join(out, "last.pt"), "--epochs", "2", "--lr", "0.5",
                       "--batch-size", "128", "--no-plot", "--quiet"]) == 0
    assert not [x for x in w if issubclass(x.category, UserWarning)]
    err = capsys.readouterr().err
    assert "awpfast-train: note: --resume: --lr 0.5 differs from the checkpoint's 0.1" in err
    assert "--batch-size 128 differs from the checkpoint's 64" in err
    assert "UserWarning" not in err and ".py:" not in err
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["lr"] < 0.1


def test_non_tty_output_is_one_line_per_epoch(tmp_path, capsys):
    args = [a for a in TINY if a not in ("--no-progress", "--quiet")]
    assert T.main(args + ["--epochs", "2", "--out", str(tmp_path / "r")]) == 0
    cap = capsys.readouterr()
    assert "\r" not in cap.err and "it/s" not in cap.err and len(cap.err) < 200, cap.err
    epoch_lines = [line for line in cap.out.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2


def test_finished_resume_and_conflicting_flags(finished, tmp_path, capsys):
    before = _digest(finished)
    assert T.main(["--resume", os.path.join(finished, "last.pt"), "--quiet"]) == 2
    assert "already finished 1 of 1 epochs" in _err_line(capsys)
    assert T.main(["--resume", os.path.join(finished, "last.pt"), "--overwrite", "--epochs", "3", "--quiet"]) == 2
    assert "contradict" in _err_line(capsys)
    # continuing from best.pt into the same folder would clobber last.pt: refused
    assert T.main(["--resume", os.path.join(finished, "best.pt"), "--epochs", "3", "--quiet"]) == 2
    assert "choose a new --out" in _err_line(capsys)
    assert _digest(finished) == before
    assert T.main(TINY + ["--ddp", "--out", str(tmp_path / "d")]) == 2
    assert "torchrun" in _err_line(capsys)


def test_autoattack_missing_gives_the_install_hint(finished, tmp_path, capsys, monkeypatch):
    import sys
    for pkg in ("autoattack", "torchattacks"):  # as on a machine without the optional extra
        monkeypatch.setitem(sys.modules, pkg, None)
    assert E.autoattack_backend("auto") is None
    js = str(tmp_path / "aa.json")
    assert E.main([os.path.join(finished, "best.pt"), "--steps", "1", "--samples", "4", "--json", js]) == 0
    out = capsys.readouterr().out
    assert "torchattacks" in out and "pip install" in out
    assert json.load(open(js))["autoattack_acc"] is None
    assert E.main([os.path.join(finished, "best.pt"), "--autoattack", "torchattacks"]) == 2
    assert "not installed" in _err_line(capsys)


def test_autoattack_through_torchattacks(finished, tmp_path):
    """torchattacks' AutoAttack standard on a tiny model. The model is chosen so that every point is
    broken by the first attack (APGD-CE): a robust point would send it through FAB-T and Square's
    5000 queries, minutes on this CPU."""
    pytest.importorskip("torchattacks", reason="optional extra: pip install torchattacks")
    import torchattacks
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    with torch.no_grad():
        lin[1].weight.normal_(0, 10.0)
    lin.eval()
    x = torch.rand(6, 3, 8, 8)
    with torch.no_grad():
        y = lin(x).argmax(1)  # all correctly classified: the attack has work to do
    assert E.autoattack_accuracy(lin, x, y, "Linf", 0.25, 4, impl="torchattacks") == 0.0
    # through the CLI, with the versions in the JSON: a checkpoint that predicts one class that none of the
    # evaluated images has (so no point survives the first attack)
    ck = torch.load(os.path.join(finished, "best.pt"), weights_only=False)
    from awpfast import data as D
    labels = D.load_dataset("synthetic", image_size=8).test.y[:3].tolist()
    c = next(k for k in range(10) if k not in labels)
    ck["model"]["fc2.bias"][c] = 1e4
    path = str(tmp_path / "const.pt")
    torch.save(ck, path)
    js = str(tmp_path / "aa.json")
    assert E.main([path, "--steps", "1", "--samples", "3", "--autoattack", "torchattacks", "--json", js]) == 0
    res = json.load(open(js))
    assert res["versions"]["torchattacks"] == torchattacks.__version__ and "torch" in res["versions"]
    assert res["autoattack"].startswith("standard (torchattacks") and res["autoattack_acc"] == 0.0


# ----------------------------------------------------------------------------- recipe fidelity
def test_validation_split_selects_best_and_is_held_out(tmp_path, capsys):
    out = str(tmp_path / "v")
    assert T.main(TINY + ["--epochs", "2", "--out", out, "--val-samples", "40"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert all(r["val_robust_acc"] is not None for r in rows)
    best = torch.load(os.path.join(out, "best.pt"), weights_only=False)
    expect = max(rows, key=lambda r: r["val_robust_acc"])["epoch"]  # first max wins
    assert best["epoch"] == expect and best["best"]["selected_on"] == "val"
    assert best["best"]["test_robust_acc"] == rows[expect - 1]["test_robust_acc"]
    # held out: the validation images are not among the training images
    from awpfast import data as D
    ds = D.load_dataset("synthetic", image_size=8)
    tr, va = D.split_validation(ds.train, 40)
    assert len(tr) + len(va) == len(ds.train) and len(va) == 40
    flat = lambda s: {tuple(r) for r in s.x.reshape(len(s), -1).mul(1e6).round().long().tolist()}  # noqa: E731
    assert not (flat(tr) & flat(va))
    tr2, va2 = D.split_validation(ds.train, 40)  # fixed, seed-independent
    assert torch.equal(va.x, va2.x)
    with pytest.raises(ValueError, match="--val-samples"):
        D.split_validation(ds.train, len(ds.train))


def test_input_normalization_on_cifar10_at(tmp_path):
    root = _fake_cifar(str(tmp_path / "c"))
    out = str(tmp_path / "r")
    args = ["--data", "cifar10", "--data-dir", root, "--model", "small-cnn", "--width", "4", "--batch-size", "32",
            "--attack-steps", "1", "--eval-steps", "1", "--eval-samples", "8", "--train-eval-samples", "8",
            "--val-samples", "10", "--epochs", "1", "--no-plot", "--quiet"]
    assert T.main(args + ["--out", out]) == 0
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    assert ck["args"]["input_norm"] == "cifar10" and ck["args"]["pad_mode"] == "reflect"
    assert "normalize.mean" not in ck["model"]  # statistics are not in the state dict: old checkpoints load
    m = models_.build_model("small-cnn", 10, 3, 4, ck["args"]["input_norm"])
    m.load_state_dict(ck["model"])
    plain = models_.build_model("small-cnn", 10, 3, 4)
    plain.load_state_dict(ck["model"])
    m.eval(), plain.eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(data_.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data_.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(m(x), plain((x - mean) / std))
    # TRADES keeps the reference's un-normalized inputs and zero padding
    out2 = str(tmp_path / "t")
    assert T.main(args + ["--out", out2, "--method", "trades"]) == 0
    a2 = json.load(open(os.path.join(out2, "args.json")))
    assert a2["input_norm"] == "none" and a2["pad_mode"] == "zeros"


def test_old_checkpoints_still_load_and_resume(finished, tmp_path, capsys):
    """A checkpoint from before --val-samples / --input-norm / --pad-mode resumes with the values given,
    and says which options it lacks."""
    ck = torch.load(os.path.join(finished, "last.pt"), weights_only=False)
    for k in ("val_samples", "input_norm", "pad_mode"):
        del ck["args"][k]
    for k in ("rng_ranks", "world_size"):
        del ck[k]
    ck["best"] = {"epoch": 1, "test_robust_acc": ck["history"][0]["test_robust_acc"], "test_clean_acc": 0.1}
    for r in ck["history"]:
        for k in ("val_clean_acc", "val_robust_acc"):
            del r[k]
    out = tmp_path / "old"
    out.mkdir()
    torch.save(ck, out / "last.pt")
    capsys.readouterr()
    assert T.main(["--resume", str(out / "last.pt"), "--epochs", "2", "--no-plot", "--quiet", "--val-samples", "0",
                   "--pad-mode", "zeros"]) == 0
    err = capsys.readouterr().err
    assert "records no --input-norm (written before that option existed)" in err
    new = torch.load(out / "last.pt", weights_only=False)
    assert new["args"]["val_samples"] == 0 and new["args"]["pad_mode"] == "zeros"
    assert new["args"]["input_norm"] == "none"  # today's default on synthetic data
    assert new["history"][1]["val_robust_acc"] is None and new["best"]["epoch"] in (1, 2)
    js = str(tmp_path / "e.json")
    assert E.main([str(out / "last.pt"), "--steps", "1", "--samples", "8", "--autoattack", "off", "--json", js]) == 0
    assert json.load(open(js))["input_norm"] == "none"


def test_demo_replaces_its_own_output_and_reports_errors_in_one_line(tmp_path, monkeypatch, capsys):
    from awpfast import demo
    seen = {}

    def fake_run(args):
        seen["args"] = args
        rec = {"epoch": 25, "test_clean_acc": 0.9, "test_robust_acc": 0.5}
        return {"out": args.out, "last": rec, "best": dict(rec, epoch=20)}

    monkeypatch.setattr(demo, "run", fake_run)
    assert demo.main([str(tmp_path / "d")]) == 0
    assert seen["args"].overwrite and seen["args"].out == str(tmp_path / "d")  # `make demo` twice works
    assert "best epoch by validation 20" in capsys.readouterr().out

    def failing(args):
        raise errors_.UsageError("--out x is an existing file, not a folder: choose another --out")

    monkeypatch.setattr(demo, "run", failing)
    assert demo.main([str(tmp_path / "d")]) == 2
    assert "awpfast demo: error: --out x is an existing file" in _err_line(capsys)
