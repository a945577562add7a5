"""Extra training data (``--extra-data``): the RST pickle and the generated-data ``.npz`` in their
exact on-disk formats, memory-mapped reading, the exact per-batch fraction, exact (mid-epoch)
resume, the rank shards, one-line errors for bad files, and the CLI end to end."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from awpfast import train as T
from awpfast.data import Split
from awpfast.errors import UsageError
from awpfast.extra_data import MixedBatches, open_extra, save_npz

S = 32  # RST and the generated-data releases: CIFAR-sized images


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, S, S, 3), dtype=np.uint8)


def write_rst_pickle(path, n=64, seed=0, labels=None):
    """RST's ti_500K_pseudo_labeled.pickle layout: {'data': uint8 N x 32 x 32 x 3, 'extrapolated_targets': ints}."""
    y = np.random.default_rng(seed + 1).integers(5, 10, n) if labels is None else labels
    with open(path, "wb") as f:
        pickle.dump({"data": _images(n, seed), "extrapolated_targets": y}, f)
    return path


def write_npz(path, n=1000, seed=0, compressed=False):
    """The generated-data releases' layout: np.savez(image=uint8 N x 32 x 32 x 3, label=ints)."""
    x, y = _images(n, seed), np.random.default_rng(seed + 1).integers(5, 10, n)
    (np.savez_compressed if compressed else np.savez)(path, image=x, label=y)
    return path


def _base(n=40, seed=3):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, generator=g), torch.randint(0, 5, (n,), generator=g))


def _batches(extra, **kw):
    kw = dict(dict(batch_size=8, fraction=0.5, augment="crop+flip", seed=1), **kw)
    return MixedBatches(_base(), extra, **kw)


def test_npz_is_memory_mapped_and_rows_match(tmp_path):
    p = write_npz(str(tmp_path / "gen.npz"), n=1000)  # > batch size x 100
    ex = open_extra(p, num_classes=10, image_size=S)
    assert ex.mapped and isinstance(ex.x, np.memmap) and len(ex) == 1000
    ref = np.load(p)
    idx = np.array([999, 3, 3, 500])
    x, y = ex.gather(idx)
    assert x.shape == (4, 3, S, S) and x.dtype == torch.uint8
    assert torch.equal(x, torch.from_numpy(ref["image"][idx]).permute(0, 3, 1, 2))
    assert torch.equal(y, torch.from_numpy(ref["label"][idx]).long())


def test_rst_pickle_reads(tmp_path):
    p = write_rst_pickle(str(tmp_path / "ti.pickle"), n=50)
    ex = open_extra(p, num_classes=10, image_size=S)
    assert len(ex) == 50 and not ex.mapped
    raw = pickle.load(open(p, "rb"))
    x, y = ex.gather(np.arange(5))
    assert torch.equal(x, torch.from_numpy(raw["data"][:5]).permute(0, 3, 1, 2))
    assert y.tolist() == list(raw["extrapolated_targets"][:5])


@pytest.mark.parametrize("fraction,batch", [(0.5, 8), (0.7, 10), (0.3, 7)])
def test_fraction_per_batch_is_exact(fraction, batch, tmp_path):
    ex = open_extra(write_npz(str(tmp_path / "g.npz"), n=200), 10, S)
    mb = _batches(ex, batch_size=batch, fraction=fraction)
    k = round(fraction * batch)
    n = 0
    for x, y in mb:  # base labels are 0..4, extra labels 5..9
        assert x.shape == (batch, 3, S, S) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert int((y >= 5).sum()) == k and int((y < 5).sum()) == batch - k
        n += 1
    assert n == len(mb) == -(-40 // (batch - k))  # an epoch: one pass over the base split by default


def test_every_base_image_once_per_epoch_and_steps_per_epoch(tmp_path):
    ex = open_extra(write_npz(str(tmp_path / "g.npz"), n=200), 10, S)
    mb = _batches(ex, augment="none")  # 4 base per batch: 10 batches cover the 40 base images once
    seen = torch.cat([x[y < 5] for x, y in mb])
    base = _base().x.float() / 255
    assert len(seen) == 40
    assert sorted(map(tuple, seen.flatten(1)[:, :4].tolist())) == sorted(map(tuple, base.flatten(1)[:, :4].tolist()))
    assert len(_batches(ex, steps_per_epoch=3)) == 3 and len(list(_batches(ex, steps_per_epoch=25))) == 25


def test_resume_is_bit_exact_mid_epoch(tmp_path):
    ex = open_extra(write_npz(str(tmp_path / "g.npz"), n=300), 10, S)
    ref = _batches(ex, seed=7)
    want = [b for _ in range(2) for b in ref]  # two epochs, uninterrupted
    a = _batches(ex, seed=7)
    it = iter(a)
    got = [next(it) for _ in range(4)]
    sd = a.state_dict()
    assert sd["pos"] == 4
    b = _batches(ex, seed=7, prefetch=False)
    b.load_state_dict(sd)
    got += list(b)  # the rest of epoch 1
    got += list(b)  # epoch 2
    assert len(got) == len(want)
    assert all(torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]) for g, w in zip(got, want))


def test_rank_shards_union_is_the_one_process_batch(tmp_path):
    ex = open_extra(write_npz(str(tmp_path / "g.npz"), n=300), 10, S)
    one = list(_batches(ex, batch_size=10, seed=2))
    shards = [list(_batches(ex, batch_size=10, seed=2, rank=r, world_size=2)) for r in range(2)]
    for i, (x, y) in enumerate(one):
        (x0, y0), (x1, y1) = shards[0][i], shards[1][i]
        assert torch.equal(torch.stack([x0, x1], 1).flatten(0, 1), x)  # positions r, r + 2, ...
        assert torch.equal(torch.stack([y0, y1], 1).flatten(0, 1), y)


@pytest.mark.parametrize("case", ["pickle-key", "npz-key", "shape", "dtype", "labels-range", "labels-count",
                                  "compressed-big", "not-a-file"])
def test_bad_files_name_the_key(case, tmp_path, monkeypatch):
    p = str(tmp_path / "bad")
    want = {"pickle-key": "'extrapolated_targets'", "npz-key": "'label'", "shape": "'image'", "dtype": "'data'",
            "labels-range": "'label'", "labels-count": "'extrapolated_targets'", "compressed-big": "np.savez",
            "not-a-file": "no such file"}[case]
    if case == "pickle-key":
        pickle.dump({"data": _images(4, 0)}, open(p, "wb"))
    elif case == "npz-key":
        np.savez(p + ".npz", image=_images(4, 0))
        p += ".npz"
    elif case == "shape":
        np.savez(p + ".npz", image=_images(4, 0)[:, :16], label=np.zeros(4, int))
        p += ".npz"
    elif case == "dtype":
        pickle.dump({"data": _images(4, 0).astype(np.float32), "extrapolated_targets": np.zeros(4, int)}, open(p, "wb"))
    elif case == "labels-range":
        np.savez(p + ".npz", image=_images(4, 0), label=np.array([0, 1, 2, 10]))
        p += ".npz"
    elif case == "labels-count":
        write_rst_pickle(p, n=4, labels=np.zeros(3, int))
    elif case == "compressed-big":
        monkeypatch.setattr("awpfast.extra_data.MAX_COMPRESSED_BYTES", 100)
        p = write_npz(p + ".npz", n=4, compressed=True)
    elif case == "not-a-file":
        p = str(tmp_path / "missing.npz")
    with pytest.raises(UsageError) as e:
        open_extra(p, num_classes=10, image_size=S)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--extra-data ") and want in msg, msg


def test_save_npz_round_trip_is_mapped(tmp_path):
    raw = _images(20, 4)
    save_npz(str(tmp_path / "c.npz"), raw, np.arange(20) % 10)
    ex = open_extra(str(tmp_path / "c.npz"), 10, S)
    assert ex.mapped and np.array_equal(np.asarray(ex.x), raw)


CLI = ["--data", "synthetic", "--image-size", "32", "--model", "small-cnn", "--width", "4", "--batch-size", "16",
       "--attack-steps", "1", "--eval-steps", "1", "--eval-samples", "16", "--train-eval-samples", "16",
       "--train-samples", "48", "--val-samples", "16", "--threads", "1", "--no-progress", "--quiet", "--no-plot"]


def test_cli_trains_with_extra_data_and_resumes_exactly(tmp_path, one_thread):
    p = write_npz(str(tmp_path / "gen.npz"), n=500)
    args = CLI + ["--extra-data", p, "--extra-fraction", "0.75", "--epochs", "3", "--seed", "1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert T.main(args + ["--out", a]) == 0
    assert T.main(args + ["--out", b, "--stop-after", "1"]) == 0
    assert T.main(["--resume", os.path.join(b, "last.pt"), "--quiet", "--no-progress"]) == 0
    ca, cb = (torch.load(os.path.join(d, "last.pt"), weights_only=False) for d in (a, b))
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert "extra_loader" in ca["rng"]
    rec = json.load(open(os.path.join(a, "args.json")))
    assert rec["extra_data"] == p and rec["extra_fraction"] == 0.75
    # 48 base images, 4 of 16 per batch: 12 steps an epoch
    assert ca["scheduler"]["last_epoch"] == 3 * 12  # LR steps taken: 12 batches an epoch


def test_cli_rejects_bad_extra_options_before_torch(tmp_path, capsys):
    assert T.main(CLI + ["--extra-data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert T.main(CLI + ["--extra-fraction", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "--extra-fraction applies with --extra-data" in capsys.readouterr().err
    p = write_npz(str(tmp_path / "g.npz"), n=20)
    assert T.main(CLI + ["--extra-data", p, "--extra-fraction", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert "--extra-fraction" in capsys.readouterr().err


def test_two_gloo_processes_read_their_shards_and_together_the_batch(tmp_path):
    """2 gloo processes: each reads its shard of every global batch from both sources; gathered,
    the shards are exactly the one-process batches."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _dist_launch import launch, skip_without_gloo
    from _extra_dist_worker import base_split, digest
    skip_without_gloo()
    write_npz(str(tmp_path / "extra.npz"), n=300)
    reports = launch("_extra_dist_worker.py", tmp_path)
    ex = open_extra(str(tmp_path / "extra.npz"), 10, S)
    one = [digest(x, y) for x, y in MixedBatches(base_split(), ex, 10, 0.7, augment="crop+flip", seed=5)]
    assert reports[0]["digests"] == reports[1]["digests"] == one
    assert reports[0]["local_rows"] == 5  # half of the global batch of 10 per process
