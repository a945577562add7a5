"""Search for an offline regime in which plain adversarial training robustly overfits (issue 14).

Each run is ``awpfast.train.run`` (the training loop of ``python -m awpfast.train``, unchanged)
with two exploration-only changes, both applied from outside the library:

* ``--eval-every K``: the per-epoch evaluation (PGD-20 on the test split and a training subset)
  runs only every K epochs and at the last epoch; the other epochs record NaN. Evaluation is
  about 2/3 of a run's time on this machine, so this makes a candidate ~2x cheaper. The skipped
  evaluations also skip their random starts, so a run's trajectory differs from the same seed
  under the plain CLI (the candidate is then confirmed with the plain CLI).
* ``--label-noise P``: symmetric label noise on the training split: a fixed fraction P of the
  training images (chosen by a generator seeded independently of ``--seed``) get a label drawn
  uniformly from the *other* classes. The test split is untouched. train.py has no such option:
  this is only to measure whether it is needed.

    python scripts/explore_regime.py run NAME --seeds 0 1 --jobs 2     # run a named candidate
    python scripts/explore_regime.py summary [NAME ...]               # table of finished runs
    python scripts/explore_regime.py list

Runs go to ``runs/explore/NAME-sSEED``; every job is started with ``nice -n 19`` and one thread.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(ROOT, "runs", "explore")

# The regime the issue calls promising (one seed: AT peaked at 82.2 at epoch 108, 81.0 last).
_PROMISING = ["--data", "digits", "--image-size", "8", "--method", "at", "--eps", "0.15", "--alpha", "0.0375",
              "--attack-steps", "10", "--eval-steps", "20", "--lr", "0.05", "--lr-schedule", "piecewise",
              "--batch-size", "64", "--model", "small-cnn", "--width", "32", "--train-samples", "640",
              "--train-eval-samples", "200", "--attack-bn", "train", "--awp-gamma", "0", "--epochs", "150"]


def _with(base, **kw):
    """``base`` with options replaced/added: ``_with(b, eps="0.25")`` sets ``--eps 0.25``."""
    out = list(base)
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if flag in out:
            i = out.index(flag)
            out[i + 1] = str(v)
        else:
            out += [flag, str(v)]
    return out


# name -> (train options, label noise fraction)
CANDIDATES = {
    "promising": (_PROMISING, 0.0),
    "eps25": (_with(_PROMISING, eps="0.25", alpha="0.0625"), 0.0),
    "eps20-wd0": (_with(_PROMISING, eps="0.2", alpha="0.05", weight_decay="0"), 0.0),
    "noise20": (_PROMISING, 0.2),
    "noise10": (_PROMISING, 0.1),
    "eps25-wd0": (_with(_PROMISING, eps="0.25", alpha="0.0625", weight_decay="0"), 0.0),
    "eps20-wd0-lr1": (_with(_PROMISING, eps="0.2", alpha="0.05", weight_decay="0", lr="0.1"), 0.0),
    "noise20-wd0": (_with(_PROMISING, weight_decay="0"), 0.2),
    "noise10-wd0": (_with(_PROMISING, weight_decay="0"), 0.1),
    "eps20-wd0-n320": (_with(_PROMISING, eps="0.2", alpha="0.05", weight_decay="0", train_samples="320",
                             batch_size="32"), 0.0),
}
# AT-AWP probes of a candidate: gamma 0.01 / 0.005 after a 10-epoch warm-up (train-mode attack kept)
for _name in ("eps20-wd0", "noise10", "eps25-wd0", "eps20-wd0-lr1", "eps20-wd0-n320"):
    for _g in ("0.01", "0.005"):
        CANDIDATES[f"{_name}-awp{_g[2:]}"] = (_with(CANDIDATES[_name][0], awp_gamma=_g, awp_warmup="10"),
                                              CANDIDATES[_name][1])
# the same probe with AWP switched on after 30 epochs (both 10-epoch probes collapsed in eps20-wd0)
CANDIDATES["eps20-wd0-awp01-w30"] = (_with(CANDIDATES["eps20-wd0"][0], awp_gamma="0.01", awp_warmup="30"), 0.0)


def add_label_noise(split, fraction: float, num_classes: int, seed: int = 14):
    """Symmetric label noise: ``round(fraction * n)`` labels replaced by a different class, uniformly."""
    import torch
    from awpfast.data import Split
    n = len(split)
    k = int(round(fraction * n))
    if k == 0:
        return split
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=g)
    y = split.y.clone()
    y[idx] = (y[idx] + shift) % num_classes
    return Split(split.x, y)


def _run_one(options, label_noise: float, eval_every: int) -> None:
    """Run awpfast.train.run in this process with the exploration patches."""
    import awpfast.train as T

    args = T.build_parser().parse_args(options)
    epochs = args.epochs
    if label_noise > 0:
        real_load = T.load_dataset
        n_train = args.train_samples

        def load_noisy(*a, **k):
            ds = real_load(*a, **k)
            if n_train is not None:  # noise the images that will actually be trained on
                ds.train = ds.train.subset(n_train)
            ds.train = add_label_noise(ds.train, label_noise, ds.num_classes)
            return ds

        T.load_dataset = load_noisy
    if eval_every > 1:
        real_eval = T.evaluate_split
        calls = [0]
        nan = {"clean_acc": math.nan, "robust_acc": math.nan, "clean_loss": math.nan, "robust_loss": math.nan, "n": 0}

        def sparse_eval(*a, **k):
            epoch = calls[0] // 2 + 1  # run() evaluates test, then train, once per epoch
            calls[0] += 1
            if epoch % eval_every == 0 or epoch == epochs:
                return real_eval(*a, **k)
            return dict(nan)

        T.evaluate_split = sparse_eval
    T.run(args)


def launch(names, seeds, jobs: int, eval_every: int, force: bool) -> None:
    todo = []
    for name in names:
        for seed in seeds:
            out = os.path.join(RUNS, f"{name}-s{seed}")
            if os.path.isfile(os.path.join(out, "done.json")) and not force:
                continue
            todo.append((name, seed, out))
    running = []
    while todo or running:
        while todo and len(running) < jobs:
            name, seed, out = todo.pop(0)
            os.makedirs(out, exist_ok=True)
            cmd = ["nice", "-n", "19", sys.executable, os.path.abspath(__file__), "_child", name, str(seed),
                   out, str(eval_every)]
            log = open(os.path.join(out, "train.log"), "w")
            env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
            print(f"start {name} seed {seed} -> {out}", flush=True)
            running.append((subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env),
                            name, seed, out, log, time.time()))
        time.sleep(5)
        for item in list(running):
            p, name, seed, out, log, t0 = item
            if p.poll() is None:
                continue
            log.close()
            running.remove(item)
            wall = time.time() - t0
            print(f"done  {name} seed {seed} exit {p.returncode} in {wall / 60:.1f} min", flush=True)
            if p.returncode == 0:
                with open(os.path.join(out, "done.json"), "w") as f:
                    json.dump({"wall_s": wall, "load_at_end": os.getloadavg()}, f)


def load(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def stats(h, last_k: int = 4):
    """Best / last / drop / mean of the last ``last_k`` evaluated epochs (NaN epochs skipped)."""
    ev = [r for r in h if not math.isnan(r["test_robust_acc"])]
    if not ev:
        return None
    best = max(ev, key=lambda r: r["test_robust_acc"])
    last = ev[-1]
    tail = ev[-last_k:]
    return {"epochs": len(h), "best_epoch": best["epoch"], "best": 100 * best["test_robust_acc"],
            "last": 100 * last["test_robust_acc"], "drop": 100 * (best["test_robust_acc"] - last["test_robust_acc"]),
            "tail_mean": 100 * sum(r["test_robust_acc"] for r in tail) / len(tail),
            "last_clean": 100 * last["test_clean_acc"], "last_train_pgd": 100 * last["train_robust_acc"],
            "train_s": sum(r["train_time_s"] for r in h), "eval_s": sum(r["eval_time_s"] for r in h)}


def summary(names) -> None:
    if not os.path.isdir(RUNS):
        print("no runs yet")
        return
    dirs = sorted(d for d in os.listdir(RUNS) if os.path.isfile(os.path.join(RUNS, d, "metrics.jsonl")))
    print("| run | epochs | best epoch | best PGD-20 | last | best-last | mean last 4 evals | last clean | "
          "last train PGD-20 | train+eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in dirs:
        if names and d.rsplit("-s", 1)[0] not in names:
            continue
        s = stats(load(os.path.join(RUNS, d)))
        if s is None:
            continue
        print(f"| {d} | {s['epochs']} | {s['best_epoch']} | {s['best']:.1f} | {s['last']:.1f} | {s['drop']:.1f} | "
              f"{s['tail_mean']:.1f} | {s['last_clean']:.1f} | {s['last_train_pgd']:.1f} | "
              f"{s['train_s']:.0f}+{s['eval_s']:.0f} |")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        name, seed, out, eval_every = argv[1], int(argv[2]), argv[3], int(argv[4])
        options, noise = CANDIDATES[name]
        _run_one(options + ["--seed", str(seed), "--out", out, "--threads", "1", "--no-progress", "--no-plot"],
                 noise, eval_every)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("names", nargs="+", choices=sorted(CANDIDATES))
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--eval-every", type=int, default=5)
    r.add_argument("--force", action="store_true")
    s = sub.add_parser("summary")
    s.add_argument("names", nargs="*")
    sub.add_parser("list")
    a = p.parse_args(argv)
    if a.cmd == "list":
        for k, (opts, noise) in CANDIDATES.items():
            print(k, " ".join(opts), f"label-noise {noise}" if noise else "")
    elif a.cmd == "run":
        launch(a.names, a.seeds, a.jobs, a.eval_every, a.force)
        summary(a.names)
    else:
        summary(a.names)


if __name__ == "__main__":
    main()
