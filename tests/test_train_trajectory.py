"""Training trajectories that hold on any CPU: a fixed-seed 2-epoch ``awpfast-train`` run in float64
equals, to 1e-10, the same run written out by hand in this file from the library's public pieces
(data, model, ``awpfast.AWP``, the attacks, the losses, ``evaluate_split``) with the schedules
(piecewise LR per iteration, the eps ramp, the AWP warm-up, ``--eval-every``, best-epoch selection)
re-derived from their documented formulas.

Both sides run on the same CPU, so the comparison holds whatever the CPU's arithmetic (AVX2,
AVX-512, AMX, ``ATEN_CPU_CAPABILITY=default``): a refactor of ``awpfast.train`` that changes the
trajectory (an extra RNG draw, a step in another order, a schedule off by one iteration) moves the
weights by far more than 1e-10 and fails here.

The bit-for-bit check of one CPU's float32 arithmetic stays as a developer tool:
``AWPFAST_TRAJECTORY_HASHES=check`` compares the float32 runs' hashes with those recorded for this
CPU model and torch version in ``tests/trajectory_hashes.json`` (``=record`` records them), for
refactors that must leave every bit unchanged; without the variable that test is skipped.
"""
import hashlib
import json
import math
import os
import random

import numpy as np
import pytest
import torch

import awpfast
from awpfast import train as T
from awpfast.attacks import PGD, TRADESAttack
from awpfast.data import Batches, load_dataset, training_splits
from awpfast.evaluate import evaluate_split
from awpfast.losses import get_loss
from awpfast.models import build_model

BASE = ["--data", "synthetic", "--image-size", "8", "--model", "small-cnn", "--width", "4",
        "--batch-size", "32", "--attack-steps", "2", "--eval-steps", "2", "--eval-samples", "32",
        "--train-eval-samples", "32", "--train-samples", "96", "--val-samples", "32", "--epochs", "2",
        "--threads", "1", "--no-progress", "--quiet", "--no-plot"]
CASES = {
    "at-awp": ["--seed", "11"],
    "trades-awp-noise-ramp": ["--seed", "4", "--method", "trades", "--awp-warmup", "1", "--label-noise", "0.2",
                              "--eps-warmup", "1", "--eval-every", "2", "--awp-restore", "before_step"],
    "at-awp-subbatch": ["--seed", "5", "--awp-ascent-fraction", "0.5", "--lr-schedule", "cosine"],
}
TIME_KEYS = ("train_time_s", "eval_time_s", "img_per_s", "flatness_time_s")
TOL = 1e-10


def _cli(args, out):
    threads = torch.get_num_threads()
    try:
        assert T.main(args + ["--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return ck, rows


# ----------------------------------------------------------------------------- the run, by hand
def _opts(extra):
    """The handful of options the hand-written run needs, read off the command line."""
    o = {"seed": 0, "method": "at", "awp_warmup": None, "label_noise": 0.0, "eps_warmup": 0, "eval_every": 1,
         "awp_restore": "after_step", "awp_ascent_fraction": 1.0, "lr_schedule": "piecewise"}
    for flag, val in zip(extra[::2], extra[1::2]):
        key = flag[2:].replace("-", "_")
        o[key] = type(o[key])(val) if o[key] is not None else int(val)
    if o["awp_warmup"] is None:
        o["awp_warmup"] = 10 if o["method"] == "trades" else 0
    return o


def _lr_factor(schedule, t, epochs):
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(t, epochs) / epochs))
    return 1.0 if t / epochs < 0.5 else (0.1 if t / epochs < 0.75 else 0.01)


def by_hand(extra):
    """awpfast-train's documented run, composed here: returns (model state, optimizer state, rows)."""
    o = _opts(extra)
    epochs, bs, eps, alpha, gamma = 2, 32, 8 / 255, 2 / 255, (0.005 if o["method"] == "trades" else 0.01)
    torch.set_num_threads(1)
    random.seed(o["seed"])
    np.random.seed(o["seed"])
    torch.manual_seed(o["seed"])
    ds = load_dataset("synthetic", None, 8)
    train, val = training_splits(ds, 32, 96, o["label_noise"])
    model = build_model("small-cnn", ds.num_classes, ds.in_channels, 4, "none").double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    awp = awpfast.AWP(opt, model, gamma=gamma, restore=o["awp_restore"], ascent_fraction=o["awp_ascent_fraction"],
                      ascent_seed=o["seed"])
    pad = "reflect" if o["method"] == "at" else "zeros"
    batches = Batches(train, bs, shuffle=True, augment=ds.augment, seed=o["seed"], pad_mode=pad)
    n_iter = len(batches)
    Attack = TRADESAttack if o["method"] == "trades" else PGD
    attack = Attack(model, eps=eps, alpha=alpha, steps=2, random_start=True)
    descent, ascent = get_loss(o["method"], 6.0, "ours"), get_loss(o["method"], 6.0)
    lr0, k = 0.1, 0
    for g in opt.param_groups:  # step k (0-based) runs at the factor of t = (k + 1) / n_iter
        g["lr"] = lr0 * _lr_factor(o["lr_schedule"], 1 / n_iter, epochs)
    rows, best_val = [], None
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["awp_gamma"] = gamma if epoch >= o["awp_warmup"] else 0.0
        model.train()
        loss_sum = 0.0
        for i, (x, y) in enumerate(batches):
            if o["eps_warmup"]:
                f = min(1.0, (epoch + (i + 1) / n_iter) / o["eps_warmup"])
                attack.eps, attack.alpha = eps * f, alpha * f
            x = x.double()
            x_adv = attack(x, y)
            model.train()
            if o["awp_ascent_fraction"] < 1:
                closure = lambda pick: ascent(model, *pick(x, x_adv, y))  # noqa: E731
            else:
                closure = lambda: ascent(model, x, x_adv, y)  # noqa: E731
            with awp.perturbed(closure):
                awp.zero_grad(set_to_none=True)
                loss = descent(model, x, x_adv, y)
                loss.backward()
                awp.step()
            k += 1
            for g in opt.param_groups:
                g["lr"] = lr0 * _lr_factor(o["lr_schedule"], (k + 1) / n_iter, epochs)
            loss_sum += loss.item() * len(y)
        ev = dict(batch_size=128, eps=eps, alpha=alpha, steps=2)
        va = evaluate_split(model, val, **ev)
        full = (epoch + 1) % o["eval_every"] == 0 or epoch + 1 == epochs or best_val is None \
            or va["robust_acc"] > best_val
        te = evaluate_split(model, ds.test, limit=32, **ev) if full else None
        tr = evaluate_split(model, train, limit=32, **ev) if full else None
        best_val = va["robust_acc"] if best_val is None else max(best_val, va["robust_acc"])
        rows.append({"train_loss": loss_sum / len(train), "val_robust_acc": va["robust_acc"],
                     "test_robust_acc": te and te["robust_acc"], "train_robust_acc": tr and tr["robust_acc"],
                     "test_clean_acc": te and te["clean_acc"]})
    return model.state_dict(), opt.state_dict()["state"], rows


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_run_equals_the_run_written_out(case, tmp_path):
    extra = CASES[case]
    ck, rows = _cli(BASE + extra + ["--dtype", "float64"], tmp_path / case)
    threads = torch.get_num_threads()
    try:
        model_sd, opt_state, ref_rows = by_hand(extra)
    finally:
        torch.set_num_threads(threads)
    for key, ref in model_sd.items():
        got = ck["model"][key]
        if ref.is_floating_point():
            scale = max(ref.abs().max().item(), 1e-30)
            assert (got - ref).abs().max().item() / scale <= TOL, f"{case}: {key} differs"
        else:
            assert torch.equal(got, ref), f"{case}: {key} differs"
    saved = ck["optimizer"]["state"]
    assert len(saved) == len(opt_state) > 0
    for pid, st in opt_state.items():
        ref = st["momentum_buffer"]
        got = saved[pid]["momentum_buffer"]
        assert (got - ref).abs().max().item() <= TOL * max(ref.abs().max().item(), 1e-30), f"{case}: momentum {pid}"
    assert len(rows) == len(ref_rows) == 2
    for r, e in zip(rows, ref_rows):
        assert r["train_loss"] == pytest.approx(e["train_loss"], rel=1e-9, abs=1e-12)
        for key in ("val_robust_acc", "test_robust_acc", "train_robust_acc", "test_clean_acc"):
            assert r[key] == e[key], f"{case}: epoch {r['epoch']} {key}"


def test_the_hand_written_run_can_fail(tmp_path):
    """The comparison is not vacuous: one option the hand-written run does not follow (here a
    different weight decay) moves the weights far beyond the tolerance."""
    extra = CASES["at-awp"]
    ck, _ = _cli(BASE + extra + ["--dtype", "float64", "--weight-decay", "0.005"], tmp_path / "wd")
    threads = torch.get_num_threads()
    try:
        model_sd, _, _ = by_hand(extra)
    finally:
        torch.set_num_threads(threads)
    worst = max((ck["model"][k] - v).abs().max().item() / max(v.abs().max().item(), 1e-30)
                for k, v in model_sd.items() if v.is_floating_point())
    assert worst > 1e3 * TOL


# ----------------------------------------------------------------------------- opt-in: one CPU's bits
HASH_FILE = os.path.join(os.path.dirname(__file__), "trajectory_hashes.json")
HASH_CASES = {"at-awp": CASES["at-awp"], "trades-awp-noise-ramp": CASES["trades-awp-noise-ramp"]}


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


def trajectory_hashes(ck, rows):
    hw = hashlib.sha256()
    _hash_tensors({"model": ck["model"], "state": ck["optimizer"]["state"]}, hw)
    clean = [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]
    return hw.hexdigest(), hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()


def machine_key():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "") or torch.backends.cpu.get_cpu_capability()
    return f"{model} | {cap} | torch {torch.__version__}"


@pytest.mark.skipif(os.environ.get("AWPFAST_TRAJECTORY_HASHES") not in ("check", "record"),
                    reason="bit hashes hold on one CPU's arithmetic only: a developer check for refactors that "
                           "must keep every bit (AWPFAST_TRAJECTORY_HASHES=record, then =check)")
@pytest.mark.parametrize("case", sorted(HASH_CASES))
def test_float32_trajectory_bits_on_this_cpu(case, tmp_path):
    ck, rows = _cli(BASE + HASH_CASES[case], tmp_path / case)
    got = trajectory_hashes(ck, rows)
    table = {}
    if os.path.isfile(HASH_FILE):
        with open(HASH_FILE) as f:
            table = json.load(f)
    key = machine_key()
    if os.environ["AWPFAST_TRAJECTORY_HASHES"] == "record":
        table.setdefault(key, {})[case] = list(got)
        with open(HASH_FILE, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        return
    if case not in table.get(key, {}):
        pytest.skip(f"no hashes recorded for {key!r}: run once with AWPFAST_TRAJECTORY_HASHES=record")
    weights, metrics = table[key][case]
    assert got[0] == weights, f"{case}: final weights / optimizer state changed on this CPU"
    assert got[1] == metrics, f"{case}: metrics.jsonl changed on this CPU"
