"""The training CLI, the data module and the evaluation CLI, on tiny data."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from awpfast import data as D
from awpfast import evaluate as E
from awpfast import train as T
from awpfast import checkpoint as checkpoint_
from awpfast import cli as cli_
from awpfast import models as models_
from awpfast.train import loop as loop_

TINY = ["--data", "synthetic", "--image-size", "8", "--model", "small-cnn", "--width", "4",
        "--batch-size", "64", "--attack-steps", "2", "--eval-steps", "3", "--eval-samples", "48",
        "--train-eval-samples", "48", "--train-samples", "128", "--eps", "8/255", "--no-progress", "--quiet"]
TIME_KEYS = ("train_time_s", "eval_time_s", "img_per_s")


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


def test_one_epoch_cli_writes_everything(tmp_path):
    out = str(tmp_path / "run")
    assert T.main(TINY + ["--epochs", "1", "--out", out, "--seed", "3"]) == 0
    for f in ("metrics.jsonl", "metrics.png", "last.pt", "best.pt", "args.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    rows = _metrics(out)
    assert len(rows) == 1
    r = rows[0]
    for k in ("epoch", "lr", "awp_gamma", "train_loss", "train_clean_acc", "train_robust_acc", "test_clean_acc",
              "test_robust_acc", "img_per_s"):
        assert k in r, k
    assert r["epoch"] == 1 and r["awp_gamma"] == 0.01 and np.isfinite(r["train_loss"])
    assert 0 <= r["test_robust_acc"] <= r["test_clean_acc"] + 1e-9 <= 1 + 1e-9
    with open(os.path.join(out, "metrics.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    assert ck["epoch"] == 1 and ck["format"] == checkpoint_.CKPT_FORMAT
    assert {"torch", "numpy", "python", "loader"} <= set(ck["rng"])
    assert "awpfast" in ck["optimizer"] and "state" in ck["optimizer"]  # AWP.state_dict(): the base optimizer's + an "awpfast" entry


def test_resume_continues_identically(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = TINY + ["--epochs", "3", "--seed", "5", "--method", "trades", "--awp-warmup", "1", "--no-plot"]
    assert T.main(args + ["--out", a]) == 0
    assert T.main(args + ["--out", b, "--stop-after", "1"]) == 0
    assert len(_metrics(b)) == 1
    assert T.main(["--resume", os.path.join(b, "last.pt"), "--no-progress", "--quiet", "--no-plot"]) == 0
    ra, rb = _metrics(a), _metrics(b)
    assert len(ra) == len(rb) == 3
    assert _strip(ra) == _strip(rb)
    assert [r["awp_gamma"] for r in ra] == [0.0, 0.005, 0.005]  # trades default gamma, warm-up 1 epoch
    ca = torch.load(os.path.join(a, "last.pt"), weights_only=False)
    cb = torch.load(os.path.join(b, "last.pt"), weights_only=False)
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    for i in sa:
        assert torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"])
    assert ca["scheduler"] == cb["scheduler"]
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])


def test_awp_off_and_mart_and_bf16(tmp_path):
    out = str(tmp_path / "m")
    assert T.main(TINY + ["--epochs", "1", "--out", out, "--method", "mart", "--awp-gamma", "0", "--amp", "bf16",
                          "--attack-bn", "train", "--no-plot"]) == 0
    r = _metrics(out)[0]
    assert r["awp_gamma"] == 0.0 and np.isfinite(r["train_loss"])


def test_lr_schedule_piecewise():
    f = lambda t: loop_.lr_factor("piecewise", t, 200)  # noqa: E731
    assert f(0.5) == 1.0 and f(99.9) == 1.0 and f(100) == 0.1 and f(149.9) == 0.1 and f(150) == 0.01
    assert abs(loop_.lr_factor("cosine", 100, 200) - 0.5) < 1e-12 and loop_.lr_factor("constant", 7, 10) == 1.0
    assert cli_.parse_float("8/255") == 8 / 255 and cli_.parse_float("0.5") == 0.5


def test_digits_fixed_split_and_shape():
    ds = D.load_dataset("digits", image_size=16)
    assert ds.train.x.shape[1:] == (3, 16, 16) and len(ds.train) == 1297 and len(ds.test) == 500
    assert float(ds.train.x.min()) >= 0 and float(ds.train.x.max()) <= 1 and float(ds.train.x.max()) > 0.9
    assert torch.equal(ds.train.x[:, 0], ds.train.x[:, 2])
    ds2 = D.load_dataset("digits", image_size=16)
    assert torch.equal(ds.test.y, ds2.test.y) and torch.equal(ds.test.x, ds2.test.x)
    assert set(ds.train.y.tolist()) == set(range(10)) and set(ds.test.y.tolist()) == set(range(10))
    # no test image is also a training image
    tr = {tuple(r) for r in ds.train.x[:, 0].reshape(len(ds.train), -1).mul(1e4).round().int().tolist()}
    te = [tuple(r) for r in ds.test.x[:, 0].reshape(len(ds.test), -1).mul(1e4).round().int().tolist()]
    assert sum(t in tr for t in te) < 5  # the raw data holds a handful of exact duplicates
    assert D.load_dataset("digits", image_size=8).train.x.shape[1:] == (3, 8, 8)


def _write_fake_cifar(folder, n=10, skip=()):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in D.CIFAR10_FILES:
        if name in skip:
            continue
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(d, f)


def test_cifar10_reader_and_errors(tmp_path, capsys):
    root = tmp_path / "data"
    _write_fake_cifar(str(root / "cifar-10-batches-py"), n=10)
    ds = D.load_dataset("cifar10", str(root))
    assert ds.train.x.shape == (50, 3, 32, 32) and ds.train.x.dtype == torch.uint8 and len(ds.test) == 10
    assert ds.augment == "crop+flip"
    # the folder itself works too
    assert len(D.load_dataset("cifar10", str(root / "cifar-10-batches-py")).train) == 50
    bad = tmp_path / "bad"
    _write_fake_cifar(str(bad / "cifar-10-batches-py"), skip=("data_batch_3", "test_batch"))
    with pytest.raises(FileNotFoundError) as e:
        D.load_dataset("cifar10", str(bad))
    msg = str(e.value)
    assert "data_batch_3" in msg and "test_batch" in msg and "data_batch_1," not in msg
    assert D.CIFAR10_URL in msg and str(bad / "cifar-10-batches-py") in msg
    assert T.main(["--data", "cifar10", "--data-dir", str(tmp_path / "nowhere"), "--quiet",
                   "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "data_batch_1" in err and D.CIFAR10_URL in err
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        D.load_dataset("cifar10", None)


def test_batches_determinism_and_augmentation():
    split = D.Split(torch.rand(37, 3, 8, 8), torch.randint(0, 10, (37,)))
    b1 = list(D.Batches(split, 10, shuffle=True, augment="crop+flip", seed=4))
    b2 = list(D.Batches(split, 10, shuffle=True, augment="crop+flip", seed=4))
    assert len(b1) == 4 and sum(len(y) for _, y in b1) == 37
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(b1, b2))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 8, 8)
    for mode, torch_mode in (("reflect", "reflect"), ("zeros", "constant")):
        c = D.random_crop(x, 1, g, mode=mode)
        xp = torch.nn.functional.pad(x, (1, 1, 1, 1), mode=torch_mode)
        for i in range(5):  # every crop is an 8x8 window of the padded image
            assert any(torch.equal(c[i], xp[i, :, r:r + 8, s:s + 8]) for r in range(3) for s in range(3))
    # reflection padding never shows the zero border: crops of a strictly positive image stay positive
    pos = torch.rand(64, 3, 8, 8) + 0.5
    assert float(D.random_crop(pos, 2, g).min()) >= 0.5
    assert float(D.random_crop(pos, 2, g, mode="zeros").min()) == 0.0


def test_evaluate_cli(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert T.main(TINY + ["--epochs", "1", "--out", out, "--no-plot"]) == 0
    capsys.readouterr()
    js = str(tmp_path / "eval.json")
    assert E.main([os.path.join(out, "best.pt"), "--steps", "3", "5", "--samples", "40", "--json", js,
                   "--autoattack", "off"]) == 0
    text = capsys.readouterr().out
    assert "PGD-3" in text and "PGD-5" in text and "clean" in text
    res = json.load(open(js))
    assert res["n"] == 40 and 0 <= res["pgd5_acc"] <= res["clean_acc"] <= 1
    assert res["autoattack_acc"] is None and "skipped" in res["autoattack"]
    # a bare state_dict needs --model
    sd = str(tmp_path / "sd.pt")
    torch.save(torch.load(os.path.join(out, "best.pt"), weights_only=False)["model"], sd)
    assert E.main([sd, "--steps", "2", "--samples", "8"]) == 2
    assert "--model" in capsys.readouterr().err
    assert E.main([sd, "--model", "small-cnn", "--width", "4", "--data", "synthetic", "--image-size", "8",
                   "--steps", "2", "--samples", "8", "--no-autoattack"]) == 0


def _bench():
    from conftest import load_source
    return load_source("bench_train_step", "benchmarks/bench_train_step.py")


def test_reference_pattern_awp_equals_awpfast_perturbation():
    """The benchmark's reference pattern (proxy model) and awpfast.AWP give the same v."""
    import copy
    import awpfast
    import torch.nn.functional as F
    bench = _bench()
    torch.manual_seed(11)
    model = models_.build_model("small-cnn", 10, 3, width=4).double()
    x_adv, y = torch.rand(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (8,))
    ref = bench.ReferenceStep(copy.deepcopy(model), 0.01, 1)
    diff = ref.calc_awp(x_adv, y)
    m2 = copy.deepcopy(model).train()
    awp = awpfast.AWP(torch.optim.SGD(m2.parameters(), lr=0.1), m2, gamma=0.01, backend="reference")
    w0 = {n: p.detach().clone() for n, p in m2.named_parameters()}
    bn0 = {k: v.clone() for k, v in m2.state_dict().items() if "running" in k}
    awp.perturb(lambda: F.cross_entropy(m2(x_adv), y))
    assert set(diff) == set(awp.perturbed_parameters)
    for n, p in m2.named_parameters():
        v = p.detach() - w0[n]
        if n in diff:
            torch.testing.assert_close(v, 0.01 * diff[n], rtol=1e-6, atol=1e-12)
        else:
            assert torch.equal(v, torch.zeros_like(v))
    for k, v in bn0.items():  # the proxy protected the real BN stats; awpfast freezes them
        assert torch.equal(m2.state_dict()[k], v)
    awp.restore()


def test_bench_train_step_smoke(tmp_path):
    bench = _bench()
    js = str(tmp_path / "b.json")
    res = bench.main(["--model", "small-cnn", "--batch", "4", "--image-size", "8", "--attack-steps", "1",
                      "--repeats", "1", "--warmup", "0", "--fast", "yes", "--json", js])
    assert [r["config"] for r in res["rows"]] == ["reference", "awpfast fp32", "awpfast bf16+cl"]
    assert json.load(open(js))["rows"][0]["speedup_vs_reference_at_awp"] == 1.0
