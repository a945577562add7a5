"""Nothing lost at any kill: a crash injected after each individual write of an epoch (``last.pt``,
``best.pt``, ``metrics.jsonl``, ``metrics.png``), at a best epoch and at the final epoch, then
``--resume``: every file equals an uninterrupted run's (weights and optimizer state bit for bit,
metrics without their timings). Also: ``--resume`` restores ``--threads``; the checkpoint readers'
one-line errors."""
import json
import os

import pytest
import torch

from awpfast import checkpoint as C
from awpfast import train as T
from awpfast.train import loop, report

BASE = ["--data", "synthetic", "--image-size", "8", "--model", "small-cnn", "--width", "4",
        "--batch-size", "32", "--attack-steps", "1", "--eval-steps", "1", "--eval-samples", "32",
        "--train-eval-samples", "32", "--train-samples", "64", "--val-samples", "32", "--epochs", "4",
        "--seed", "2", "--no-progress", "--quiet"]
TIME_KEYS = ("train_time_s", "eval_time_s", "img_per_s", "flatness_time_s")
WRITES = ("last.pt", "best.pt", "metrics.jsonl", "metrics.png")


class Killed(BaseException):
    """Stands for kill -9: nothing in awpfast catches it."""


# validation PGD accuracy per epoch, by the epoch the kill hits: epoch 2 a new best that stays the best
# to the end (its weights must not be lost); the final epoch 4 a new best (best.pt written last of all)
VAL = {2: (0.01, 0.03, 0.02, 0.02), 4: (0.01, 0.03, 0.02, 0.04)}


def _scripted_val(mp, val):
    """Replace the selection metric by ``val``, so that the best epochs are known (the same in every run)."""
    real = loop.evaluate_epoch

    def scripted(t, epoch=None):
        rec = real(t, epoch)
        rec["val_robust_acc"] = val[len(t.history)]
        return rec

    mp.setattr(loop, "evaluate_epoch", scripted)


def _crash_after(monkeypatch, name, epoch):
    """Raise Killed right after the write of ``name`` in 1-based ``epoch``."""
    real_save, real_metrics, real_plot = loop.atomic_save, report.write_metrics, report.plot_metrics

    def save(state, path):
        real_save(state, path)
        if os.path.basename(path) == name and state["epoch"] == epoch:
            raise Killed(name)

    def metrics(path, history):
        real_metrics(path, history)
        if name == "metrics.jsonl" and len(history) == epoch:
            raise Killed(name)

    def plot(history, path, title=""):
        out = real_plot(history, path, title)
        if name == "metrics.png" and len(history) == epoch:
            raise Killed(name)
        return out

    monkeypatch.setattr(loop, "atomic_save", save)
    monkeypatch.setattr(report, "write_metrics", metrics)
    monkeypatch.setattr(report, "plot_metrics", plot)


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


def _tensors_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def _snapshot(out):
    snap = {}
    for f in ("last.pt", "best.pt"):
        ck = torch.load(os.path.join(out, f), weights_only=False)
        snap[f] = {"epoch": ck["epoch"], "model": ck["model"], "state": ck["optimizer"]["state"],
                   "best": ck["best"], "history": _strip(ck["history"])}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        snap["metrics"] = _strip([json.loads(line) for line in f])
    snap["files"] = sorted(os.listdir(out))
    return snap


def _assert_same_run(got, want):
    assert got["files"] == want["files"]  # no *.tmp left behind, nothing missing
    assert got["metrics"] == want["metrics"]
    for f in ("last.pt", "best.pt"):
        for k in ("epoch", "best", "history"):
            assert got[f][k] == want[f][k], (f, k)
        assert _tensors_equal(got[f]["model"], want[f]["model"]), f
        assert _tensors_equal(got[f]["state"], want[f]["state"]), f


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of each VAL pattern (computed once)."""
    runs = {}

    def get(epoch):
        if epoch not in runs:
            mp = pytest.MonkeyPatch()
            _scripted_val(mp, VAL[epoch])
            try:
                out = str(tmp_path_factory.mktemp("ref") / "run")
                assert T.main(BASE + ["--out", out, "--threads", "1"]) == 0
            finally:
                mp.undo()
            runs[epoch] = _snapshot(out)
        return runs[epoch]

    return get


@pytest.mark.parametrize("epoch", [2, 4], ids=["best-epoch", "final-epoch"])
@pytest.mark.parametrize("name", WRITES)
def test_kill_after_each_write_then_resume(name, epoch, uninterrupted, monkeypatch, tmp_path,
                                           capsys, one_thread):
    want = uninterrupted(epoch)
    _scripted_val(monkeypatch, VAL[epoch])
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        _crash_after(m, name, epoch)
        with pytest.raises(Killed):
            T.main(BASE + ["--out", out, "--threads", "1"])
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    if name == "last.pt":  # the window: last.pt records this epoch as the best, best.pt an older one
        assert ck["best"]["epoch"] == epoch and C.checkpoint_epoch(os.path.join(out, "best.pt")) < epoch
    capsys.readouterr()
    rc = T.main(["--resume", os.path.join(out, "last.pt"), "--no-progress", "--quiet"])
    err = capsys.readouterr().err
    finished_clean = epoch == 4 and name == "metrics.png"  # every write of the last epoch landed
    assert rc == (2 if finished_clean else 0), err
    if finished_clean:
        assert "nothing to resume" in err
    elif epoch == 4:
        assert "repaired" in err  # a finished run whose files disagreed: says what it repaired
    _assert_same_run(_snapshot(out), want)


def test_resume_restores_threads(tmp_path, one_thread):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = BASE + ["--threads", "1", "--no-plot"]
    assert T.main(args + ["--out", a]) == 0
    assert T.main(args + ["--out", b, "--stop-after", "1"]) == 0
    torch.set_num_threads(2)  # the resuming process starts on another thread count
    assert T.main(["--resume", os.path.join(b, "last.pt"), "--no-progress", "--quiet", "--no-plot"]) == 0
    assert torch.get_num_threads() == 1  # the checkpoint's --threads
    sa, sb = _snapshot(a), _snapshot(b)
    _assert_same_run(sb, sa)


def test_resume_with_other_threads_is_noted_and_ignored(tmp_path, capsys, one_thread):
    b = str(tmp_path / "b")
    assert T.main(BASE + ["--threads", "1", "--no-plot", "--out", b, "--stop-after", "1"]) == 0
    capsys.readouterr()
    assert T.main(["--resume", os.path.join(b, "last.pt"), "--threads", "2", "--quiet", "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert "--threads 2 differs from the checkpoint's 1; using the checkpoint's" in err
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("case", ["missing", "folder", "empty", "text", "plain", "incomplete"])
def test_read_checkpoint_errors_are_one_line(case, tmp_path):
    p = str(tmp_path / "ck.pt")
    if case == "folder":
        p = str(tmp_path)
    elif case == "empty":
        open(p, "w").close()
    elif case == "text":
        open(p, "w").write("hello\n")
    elif case == "plain":
        torch.save({"w": torch.zeros(2)}, p)
    elif case == "incomplete":
        torch.save({"format": C.CKPT_FORMAT, "epoch": 1}, p)
    with pytest.raises(C.UsageError) as e:
        C.read_checkpoint(p, "--resume")
    msg = str(e.value)
    assert msg.startswith("--resume: ") and "\n" not in msg
    assert {"missing": "no such file", "folder": "is a folder", "empty": "empty", "text": "not a readable",
            "plain": "not an awpfast-train checkpoint", "incomplete": "incomplete"}[case] in msg
    if case == "plain":  # a bare state_dict is a model checkpoint for evaluate
        assert C.read_model_checkpoint(p)["model"]["w"].shape == (2,)
