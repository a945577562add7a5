"""awpfast.continual: the 10-split CIFAR-100 path (reader on files in the exact on-disk format,
AlexNet, BatchNorm handling, multi-head), GPM's own protocol, per-layer thresholds and the
bounded soft weights."""
import inspect
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

from awpfast.continual import Config, ContinualLearner, GPMMemory, mlp, run_experiment
from awpfast.continual.cifar import AlexNet, read_cifar100, run_cifar, split_tasks, write_synthetic_cifar100
from awpfast.continual.run import _parser, main


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return write_synthetic_cifar100(str(tmp_path_factory.mktemp("cifar") / "cifar-100-python"), 4, 2, seed=3)


def test_synthetic_files_are_in_the_standard_format(cifar_dir):
    """What the real archive holds: pickles loadable with encoding='bytes', byte-string keys,
    uint8 N x 3072 rows (channel-major), fine labels as a list of ints."""
    assert sorted(os.listdir(cifar_dir)) == ["meta", "test", "train"]
    with open(os.path.join(cifar_dir, "train"), "rb") as f:
        d = pickle.load(f, encoding="bytes")
    assert {b"data", b"fine_labels", b"coarse_labels", b"filenames"} <= set(d)
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (400, 3072)
    assert isinstance(d[b"fine_labels"], list) and sorted(set(d[b"fine_labels"])) == list(range(100))
    with open(os.path.join(cifar_dir, "meta"), "rb") as f:
        assert len(pickle.load(f, encoding="bytes")[b"fine_label_names"]) == 100


def test_synthetic_writer_is_documented_where_users_read(cifar_dir):
    """docs/continual.md shows the writer's real call (parameters and defaults), what it writes, and a
    snippet using it; the CLI's --help points at it."""
    doc = " ".join(open(os.path.join(os.path.dirname(__file__), "..", "docs", "continual.md")).read().split())
    params = inspect.signature(write_synthetic_cifar100).parameters.values()
    call = "write_synthetic_cifar100(" + ", ".join(
        p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params) + ")"
    assert call in doc, call
    for what in ("b'data'", "b'fine_labels'", "b'coarse_labels'", "b'filenames'", "b'fine_label_names'",
                 "b'coarse_label_names'", "uint8"):
        assert what in doc.split("Without the data set: synthetic files")[1][:1500], what
    assert "from awpfast.continual.cifar import read_cifar100, write_synthetic_cifar100" in doc
    help_text = " ".join(_parser().format_help().split())
    assert "awpfast.continual.cifar.write_synthetic_cifar100(DIR)" in help_text


def test_reader_and_task_split(cifar_dir):
    xtr, ytr, xte, yte = read_cifar100(cifar_dir)
    assert xtr.dtype == torch.uint8 and xtr.shape == (400, 3, 32, 32) and xte.shape == (200, 3, 32, 32)
    assert ytr.dtype == torch.int64 and int(ytr.max()) == 99
    with open(os.path.join(cifar_dir, "train"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    # row i is image i, channel-major: the first 1024 bytes are the red plane
    assert torch.equal(xtr[7, 0].flatten(), torch.from_numpy(raw[b"data"][7, :1024]))
    assert torch.equal(xtr[7, 2].flatten(), torch.from_numpy(raw[b"data"][7, 2048:]))
    assert ytr[7] == raw[b"fine_labels"][7]
    tasks = split_tasks((xtr, ytr, xte, yte), n_tasks=10, pc_valid=0.25, seed=0)
    assert len(tasks) == 10
    for t, task in enumerate(tasks):
        for k in ("y_train", "y_valid", "y_test"):
            assert set(task[k].tolist()) <= set(range(10 * t, 10 * t + 10))
        assert len(task["y_valid"]) == 10 and len(task["y_train"]) == 30 and len(task["y_test"]) == 20
        assert task["x_train"].dtype == torch.float32 and task["x_train"].shape[1:] == (3, 32, 32)
    small = split_tasks((xtr, ytr, xte, yte), n_tasks=2, pc_valid=0.25, seed=0, samples_per_task=5)
    assert len(small) == 2 and len(small[0]["y_train"]) == 5


def test_reader_errors_name_the_problem(tmp_path, cifar_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_cifar100(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("meta", "test"):
        with open(os.path.join(cifar_dir, name), "rb") as f, open(bad / name, "wb") as g:
            g.write(f.read())
    with pytest.raises(FileNotFoundError, match="train is missing"):
        read_cifar100(str(bad))
    with open(bad / "train", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(ValueError, match="fine_labels"):
        read_cifar100(str(bad))
    with open(bad / "train", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.float32), b"fine_labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="uint8"):
        read_cifar100(str(bad))


def test_alexnet_shapes_protected_layers_and_bn_styles():
    torch.manual_seed(0)
    for bn, n_bn in (("gpm", 5), ("fs-dgpm", 1)):
        net = AlexNet(100, bn)
        assert net(torch.randn(3, 3, 32, 32)).shape == (3, 100)
        bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(bns) == n_bn
        assert all(b.track_running_stats == (bn == "fs-dgpm") for b in bns)
        mem = GPMMemory(net, layers=net.protected)
        assert net.head not in mem.layers and len(mem.layers) == 5
        assert mem.dims() == [48, 576, 512, 1024, 2048]
        net.eval()
        reps = mem.representations(torch.randn(2, 3, 32, 32))
        assert [r.shape for r in reps] == [(48, 2 * 29 * 29), (576, 2 * 12 * 12), (512, 2 * 5 * 5), (1024, 2),
                                           (2048, 2)]


def test_multi_head_scores_each_sample_on_its_own_task_block():
    net = nn.Linear(4, 30, bias=False)
    learner = ContinualLearner(net, Config(method="sgd", task_classes=10))
    logits = torch.full((2, 30), -5.0)
    logits[0, 13] = 9.0   # sample 0 (label 13, task 1): class 3 of block 1
    logits[0, 2] = 50.0   # a larger logit in another task's block must not matter
    logits[1, 27] = 9.0   # sample 1 (label 25, task 2): predicts 7, wrong
    y = torch.tensor([13, 25])
    blk, yy = learner._block(logits, y)
    assert torch.equal(yy, torch.tensor([3, 5])) and blk.shape == (2, 10)
    assert blk[0].argmax() == 3 and blk[1].argmax() == 7
    ref = torch.nn.functional.cross_entropy(torch.stack([logits[0, 10:20], logits[1, 20:30]]), yy)
    assert float(learner._loss(logits, y)) == pytest.approx(float(ref))


def test_gpm_bn_affine_learns_on_the_first_task_only(cifar_dir):
    torch.manual_seed(0)
    net = AlexNet(100, "gpm")
    cfg = Config(method="gpm", task_classes=10, batch_size=8, glances=1, momentum=0.0, norm_clip=False,
                 freeze_bn_after_first=True, rep_samples=4, rep_layer_samples=(1, 2, 2, 4, 4), thres=0.9)
    learner = ContinualLearner(net, cfg, torch.Generator().manual_seed(0), protect=net.protected)
    tasks = split_tasks(read_cifar100(cifar_dir), n_tasks=2, pc_valid=0.25, seed=0)
    bn_w = lambda: torch.cat([m.weight.detach().clone() for m in net.modules() if isinstance(m, nn.BatchNorm2d)])
    w0 = bn_w()
    for t, task in enumerate(tasks):
        learner.begin_task(t)
        net.train()
        learner.observe(task["x_train"][:8], task["y_train"][:8])
        if t == 0:
            assert not torch.equal(bn_w(), w0)
            w1 = bn_w()
        else:
            assert torch.equal(bn_w(), w1)
        net.eval()
        learner.end_task(task["x_train"])
    sizes = learner.memory.sizes()
    # per-layer sample counts: conv1 from 1 image (841 patches), fc1 from 4 samples
    assert 0 < sizes[0] <= 48 and 0 < sizes[3] <= 8


def test_run_cifar_two_tasks_and_cli(cifar_dir, tmp_path, capsys, one_thread):
    res = run_cifar("fs-dgpm", 0, cifar_dir, n_tasks=2, epochs=1, samples_per_task=16, second_order=False)
    assert len(res["acc_matrix"]) == 2 and res["epochs_run"] == [1, 1] and len(res["seconds_per_task"]) == 2
    assert res["config"]["memory_size"] == 1000 and res["config"]["batch_size"] == 64 and res["bn"] == "fs-dgpm"
    assert res["memory_bytes"]["replay"] > 0 and len(res["basis_sizes"]) == 2
    out = str(tmp_path / "c.json")
    assert main(["--preset", "cifar100-paper", "--method", "gpm", "--data-dir", cifar_dir, "--tasks", "2",
                 "--epochs", "1", "--samples-per-task", "16", "--quiet", "--json", out]) == 0
    r = json.load(open(out))
    assert r["dataset"] == "cifar100" and r["config"]["thres"] == 0.97 and r["config"]["momentum"] == 0.0
    assert r["config"]["rep_layer_samples"] == [24, 100, 100, 125, 125] and r["bn"] == "gpm"
    capsys.readouterr()
    assert main(["--preset", "cifar100-paper", "--method", "gpm", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-dir" in err[0]
    assert main(["--preset", "cifar100-paper", "--data-dir", str(tmp_path / "none"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_gpm_protocol_and_per_layer_thresholds(one_thread, capsys):
    r = run_experiment("gpm", "quick", 0, n_tasks=2, samples_per_task=30, protocol="gpm")
    c = r["config"]
    assert (c["momentum"], c["epochs"], c["glances"], c["norm_clip"], c["thres"], c["thres_add"]) == \
        (0.0, 5, 1, False, [0.95, 0.99, 0.99], 0.0)
    assert r["protocol"] == "gpm" and r["steps"] == 2 * 5 * 3
    with pytest.raises(ValueError, match="for --method gpm"):
        run_experiment("fs-dgpm", "quick", 0, n_tasks=1, samples_per_task=10, protocol="gpm")
    assert Config(thres=(0.9, 0.95), thres_add=0.02).threshold(2) == [pytest.approx(0.94), pytest.approx(0.99)]
    assert Config(thres=(0.9, 0.99), thres_add=0.01).threshold(5) == [pytest.approx(0.95), 0.99999999999]
    with pytest.raises(ValueError, match="thres"):
        Config(thres=(0.9, 1.5)).validate()
    assert main(["--method", "sgd", "--protocol", "gpm", "--quiet", "--tasks", "1"]) == 2
    assert "for --method gpm" in capsys.readouterr().err


def test_bounded_soft_weights_move_and_stay_in_bounds(one_thread):
    gen = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    cfg = Config(method="fs-dgpm", glances=2, eta1=0.5, eta2=0.5, memory_size=20, soft="bounded", lam_floor=0.6)
    lr = ContinualLearner(mlp(16, 12, 4), cfg, gen)
    x, y = torch.rand(40, 16, generator=gen), torch.randint(0, 4, (40,), generator=gen)
    lr.begin_task(0)
    for i in range(0, 40, 10):
        lr.observe(x[i:i + 10], y[i:i + 10])
    lr.end_task(x)
    lr.begin_task(1)
    assert all(torch.equal(l, torch.ones_like(l)) for l in lr.lambdas() if l is not None)
    x2 = torch.rand(40, 16, generator=gen)
    for i in range(0, 40, 10):
        lr.observe(x2[i:i + 10], y[i:i + 10])
    lam = torch.cat([l for l in lr.lambdas() if l is not None])
    assert float(lam.min()) >= 0.6 and float(lam.max()) <= 1.0
    assert float(lam.min()) < 1.0 - 1e-3  # it moved
    with pytest.raises(ValueError, match="soft"):
        Config(soft="nope").validate()
    with pytest.raises(ValueError, match="lam_floor"):
        Config(lam_floor=1.0).validate()
