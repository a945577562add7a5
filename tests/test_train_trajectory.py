"""Training trajectories, bit for bit: a fixed-seed 2-epoch run of ``awpfast-train`` gives the same
final weights, optimizer state and metrics (timings aside) as the code before the train/ split.

The expected hashes were computed with the code of commit 537ad80 (``awpfast/train.py`` in one
file) on this project's CPU (torch 2.13.0, 1 thread). A refactor that changes one bit of a
trajectory fails here; a deliberate change of the numbers updates the hashes in its own commit."""
import hashlib
import json
import os

import pytest
import torch

from awpfast import train as T

BASE = ["--data", "synthetic", "--image-size", "8", "--model", "small-cnn", "--width", "4",
        "--batch-size", "32", "--attack-steps", "2", "--eval-steps", "2", "--eval-samples", "32",
        "--train-eval-samples", "32", "--train-samples", "96", "--val-samples", "32", "--epochs", "2",
        "--threads", "1", "--no-progress", "--quiet", "--no-plot"]
CASES = {
    "at-awp": (["--seed", "11"], "WEIGHTS_AT", "METRICS_AT"),
    "trades-awp-noise-ramp": (["--seed", "4", "--method", "trades", "--awp-warmup", "1", "--label-noise", "0.2",
                               "--eps-warmup", "1", "--eval-every", "2", "--awp-restore", "before_step"],
                              "WEIGHTS_TR", "METRICS_TR"),
}
EXPECTED = {
    "WEIGHTS_AT": "b06585e33428ad6a09d34e1b718503e61504ae273e9b765a6e7b5dd5bf28c16b",
    "METRICS_AT": "277ea23a7d8a89aa2fb8d23e846c643a860ee6683f28c1c557c204715fbb091a",
    "WEIGHTS_TR": "293b64c6955d9d77f5f3c40671288e9c65051a2d9151fb88343386a1fe23a049",
    "METRICS_TR": "c2bd52f4bc99e3e22ff578fa8adce9f52cd6605177cba480822b52382a937234",
}
TIME_KEYS = ("train_time_s", "eval_time_s", "img_per_s", "flatness_time_s")


def _hash_tensors(obj, h):
    if isinstance(obj, torch.Tensor):
        h.update(str(obj.dtype).encode())
        h.update(obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _hash_tensors(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _hash_tensors(v, h)
    else:
        h.update(repr(obj).encode())


def trajectory_hashes(out):
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    hw = hashlib.sha256()
    _hash_tensors({"model": ck["model"], "state": ck["optimizer"]["state"]}, hw)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS} for line in f]
    hm = hashlib.sha256(json.dumps(rows, sort_keys=True).encode())
    return hw.hexdigest(), hm.hexdigest()


@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectory_unchanged(case, tmp_path):
    extra, kw, km = CASES[case]
    threads = torch.get_num_threads()
    try:
        assert T.main(BASE + extra + ["--out", str(tmp_path / case)]) == 0
    finally:
        torch.set_num_threads(threads)
    weights, metrics = trajectory_hashes(str(tmp_path / case))
    assert weights == EXPECTED[kw], f"{case}: final weights / optimizer state changed"
    assert metrics == EXPECTED[km], f"{case}: metrics.jsonl changed"
