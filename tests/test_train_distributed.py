"""``awpfast-train`` under ``torchrun`` (the CLI part), on CPU with gloo.

* the loader's sharding: the processes' batches together are exactly the one-process batch
  (same permutation, same augmentation), padded like ``DistributedSampler``;
* ``python -m torch.distributed.run --nproc_per_node 2 -m awpfast.train`` (digits, tiny, DDP):
  trains, only rank 0 prints and writes (every file write is logged per rank by a
  ``sitecustomize`` shim), the sharded, all-reduced evaluation equals a one-process evaluation
  of the saved weights, and a second torchrun launch resumes the run;
* FSDP2 (``--fsdp``): resumes a one-process checkpoint, trains, writes a gathered checkpoint
  that a one-process run resumes.

The torchrun launches start three Python processes each (tens of seconds on a loaded 2-core
machine), so there are three launches in all.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from _dist_launch import free_port
from awpfast import data as D
from awpfast import train as T
from awpfast import evaluate as evaluate_
from awpfast import models as models_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "digits", "--image-size", "8", "--model", "small-cnn", "--width", "4", "--batch-size", "64",
        "--attack-steps", "1", "--eval-steps", "1", "--eval-samples", "61", "--train-eval-samples", "32",
        "--train-samples", "150", "--val-samples", "33", "--no-plot"]

needs_dist = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")

# Logs every os.replace / os.makedirs / open-for-writing of the awpfast processes with their rank.
SHIM = '''
import builtins, os
_log = os.environ.get("AWPFAST_TEST_WRITE_LOG")
if _log:
    _rank = os.environ.get("RANK", "-")
    _replace, _makedirs, _open = os.replace, os.makedirs, builtins.open

    def _note(kind, path):
        with _open(_log, "a") as f:
            f.write(f"{_rank} {kind} {os.path.abspath(str(path))}\\n")

    def replace(src, dst, *a, **k):
        _note("replace", dst)
        return _replace(src, dst, *a, **k)

    def makedirs(name, *a, **k):
        _note("makedirs", name)
        return _makedirs(name, *a, **k)

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            _note("open", file)
        return _open(file, mode, *a, **k)

    os.replace, os.makedirs, builtins.open = replace, makedirs, open_
'''


def _torchrun(args, tmp_path, nproc=2, timeout=240):
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(SHIM)
    log = tmp_path / "writes.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", AWPFAST_TEST_WRITE_LOG=str(log))
    env.pop("AWPFAST_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "awpfast.train"] + args
    p = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=timeout)
    writes = log.read_text().splitlines() if log.exists() else []
    return p, writes


def _writes_under(writes, folder):
    folder = os.path.abspath(str(folder))
    return [w.split(" ", 2) for w in writes if w.split(" ", 2)[2].startswith(folder)]


# ----------------------------------------------------------------------------- sharded loading
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("augment", ["none", "crop+flip"])
def test_sharded_batches_partition_the_global_batch(world, augment):
    g = torch.Generator().manual_seed(0)
    split = D.Split(torch.rand(37, 3, 8, 8, generator=g), torch.arange(37))
    one = list(D.Batches(split, 12, shuffle=True, augment=augment, seed=5))
    ranks = [list(D.Batches(split, 12, shuffle=True, augment=augment, seed=5, rank=r, world_size=world))
             for r in range(world)]
    assert all(len(b) == len(one) == 4 for b in ranks)
    for i, (x1, y1) in enumerate(one):
        xs = [ranks[r][i][0] for r in range(world)]
        ys = [ranks[r][i][1] for r in range(world)]
        assert len({len(y) for y in ys}) == 1  # every process gets the same number of examples
        m = len(y1)
        per = -(-m // world)
        for r in range(world):
            pos = (torch.arange(per * world) % m)[r::world]  # strided positions, padded by wrapping around
            assert torch.equal(ys[r], y1[pos]) and torch.equal(xs[r], x1[pos])
        # without padding the union is exactly the one-process batch (labels are unique indices)
        got = torch.cat(ys)
        assert set(got.tolist()) == set(y1.tolist())
    # the generators stay in lockstep (what --resume restores from rank 0's checkpoint)
    b0 = D.Batches(split, 12, shuffle=True, augment=augment, seed=5, rank=0, world_size=world)
    b1 = D.Batches(split, 12, shuffle=True, augment=augment, seed=5, rank=world - 1, world_size=world)
    list(b0), list(b1)
    assert torch.equal(b0.generator.get_state(), b1.generator.get_state())
    with pytest.raises(ValueError, match="rank"):
        D.Batches(split, 12, rank=2, world_size=2)


def test_global_batch_must_split_evenly(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert T.main(TINY + ["--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 64 is the global batch" in err and "3 processes" in err
    assert not os.path.exists(tmp_path / "x")


# ----------------------------------------------------------------------------- torchrun
@needs_dist
def test_torchrun_ddp_trains_writes_on_rank0_only_and_resumes(tmp_path):
    out = tmp_path / "run"
    p, writes = _torchrun(TINY + ["--epochs", "3", "--stop-after", "1", "--out", str(out), "--seed", "2"], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("epoch   1/3") == 1 and p.stdout.count("awpfast-train: at + AWP") == 1  # rank 0 prints
    assert "x 2 (ddp)" in p.stdout
    mine = _writes_under(writes, out)
    assert mine and {w[0] for w in mine} == {"0"}, mine  # only rank 0 touched --out
    assert {os.path.basename(w[2]) for w in mine if w[1] == "replace"} >= {"last.pt", "best.pt", "metrics.jsonl"}
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["epoch"] == 1 and ck["world_size"] == 2 and len(ck["rng_ranks"]) == 2
    assert not torch.equal(ck["rng_ranks"][0]["torch"], ck["rng_ranks"][1]["torch"])  # own attack noise per rank
    assert torch.equal(ck["rng_ranks"][0]["loader"], ck["rng_ranks"][1]["loader"])  # shared data order
    # the sharded, all-reduced evaluation equals a one-process evaluation of the saved weights
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    ds = D.load_dataset("digits", image_size=8)
    _, val = D.split_validation(ds.train, 33)
    model = models_.build_model("small-cnn", 10, 3, 4)
    model.load_state_dict(ck["model"])
    ev = dict(batch_size=128, eps=8 / 255, alpha=2 / 255, steps=0)
    assert evaluate_.evaluate_split(model, ds.test, limit=61, **ev)["clean_acc"] == pytest.approx(rec["test_clean_acc"],
                                                                                           abs=1e-12)
    assert evaluate_.evaluate_split(model, val, **ev)["clean_acc"] == pytest.approx(rec["val_clean_acc"], abs=1e-12)
    # a second launch resumes
    p2, writes2 = _torchrun(["--resume", str(out / "last.pt"), "--stop-after", "1", "--no-plot"], tmp_path)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    assert p2.stdout.count("resumed from epoch 1") == 1 and p2.stdout.count("epoch   2/3") == 1
    assert {w[0] for w in _writes_under(writes2[len(writes):], out)} == {"0"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0] == rec
    # ... and so does one process (another world size)
    assert T.main(["--resume", str(out / "last.pt"), "--quiet", "--no-plot"]) == 0
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 3


@needs_dist
def test_torchrun_fsdp_resumes_and_writes_a_full_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert T.main(TINY + ["--epochs", "3", "--stop-after", "1", "--out", str(out), "--quiet"]) == 0
    p, writes = _torchrun(["--resume", str(out / "last.pt"), "--stop-after", "1", "--fsdp"], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "x 2 (fsdp)" in p.stdout and p.stdout.count("epoch   2/3") == 1
    assert {w[0] for w in _writes_under(writes, out)} == {"0"}
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["epoch"] == 2 and ck["world_size"] == 2
    model = models_.build_model("small-cnn", 10, 3, 4)
    model.load_state_dict(ck["model"])  # full (gathered) tensors, the one-process layout
    assert all(type(v) is torch.Tensor for v in ck["model"].values())
    base = ck["optimizer"]  # the base optimizer's state dict plus the wrapper's "awpfast" entry
    assert sorted(base["state"]) == list(range(len(list(model.parameters()))))
    for i, p_ in enumerate(model.parameters()):
        assert base["state"][i]["momentum_buffer"].shape == p_.shape
    assert T.main(["--resume", str(out / "last.pt"), "--quiet", "--no-plot"]) == 0
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 3


@needs_dist
def test_torchrun_fsdp_awp_resume_is_exact(tmp_path):
    """FSDP2 with AWP, stopped after one epoch and resumed, ends bit for bit where the uninterrupted run
    ends (the resumed run used to take its first AWP direction without the previous step's stale
    gradient, which the uninterrupted one wrongly added for the root unit's layers)."""
    args = TINY + ["--epochs", "2", "--seed", "3", "--quiet", "--fsdp"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for extra in (["--out", str(whole)], ["--out", str(parts), "--stop-after", "1"],
                  ["--resume", str(parts / "last.pt"), "--fsdp", "--quiet"]):
        p, _ = _torchrun(args + extra if "--resume" not in extra else extra, tmp_path)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    a = torch.load(whole / "last.pt", weights_only=False)
    b = torch.load(parts / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2 and a["optimizer"]["awpfast"]["perturb_count"] > 0
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for i, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"]), i


def test_resuming_an_fsdp_run_under_torchrun_without_fsdp_is_refused(monkeypatch, tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main(TINY + ["--epochs", "2", "--stop-after", "1", "--out", str(out), "--quiet"]) == 0
    ck = torch.load(out / "last.pt", weights_only=False)
    ck["args"]["fsdp"], ck["world_size"] = True, 2  # as written by a 2-process --fsdp run
    torch.save(ck, out / "last.pt")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert T.main(["--resume", str(out / "last.pt"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "trained under FSDP2" in err and "pass --fsdp" in err and len(err.strip().splitlines()) == 1
