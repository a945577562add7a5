"""Search for an offline regime in which plain adversarial training robustly overfits (issue 14).

Each run is ``awpfast.train.run`` (the training loop of ``python -m awpfast.train``, unchanged)
with one exploration-only change, applied from outside the library:

* ``--eval-every K``: the per-epoch evaluation (PGD-20 on the validation split, the test split and a
  training subset, and ``--track-flatness``) runs only every K epochs and at the last epoch; the
  other epochs record NaN (``awpfast-train --eval-every`` itself still evaluates the validation split
  every epoch and the test split at every new validation best; this is cheaper still). Evaluation is most of a run's time on this machine, so this makes a
  candidate several times cheaper. The skipped evaluations also skip their random starts, so a
  run's trajectory differs from the same seed under the plain CLI (a candidate is then confirmed
  with the plain CLI, ``scripts/reproduce.py``).

Label noise and the eps warm-up are ``awpfast-train`` options (``--label-noise``, ``--eps-warmup``).

    python scripts/explore_regime.py run NAME [NAME ...] --seeds 0 1 --jobs 2
    python scripts/explore_regime.py summary [NAME ...]               # table of finished runs
    python scripts/explore_regime.py curve NAME-sSEED                 # its evaluated epochs
    python scripts/explore_regime.py list

Runs go to ``runs/explore/NAME-sSEED``; every job is started with ``nice -n 19`` and one thread.

Earlier exploration (digits 8x8, 640 training images, SmallCNN-32, batch 64, 150 epochs, LR 0.05,
train-mode attack, no eps warm-up): setups that trained did not lose more than 2.4 points of test
PGD-20 after their peak (eps 0.2 without weight decay; 10 % label noise), and the harder ones
(eps 0.25; 320 images at eps 0.2; 20 % label noise; LR 0.1) stayed at chance from the first epoch.
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

# digits 8x8, SmallCNN, train-mode PGD-10 (the reference AT recipe's attack), piecewise LR
_BASE = ["--data", "digits", "--image-size", "8", "--method", "at", "--eps", "0.15", "--alpha", "0.0375",
         "--attack-steps", "10", "--eval-steps", "20", "--lr", "0.05", "--lr-schedule", "piecewise",
         "--batch-size", "64", "--model", "small-cnn", "--width", "32", "--train-samples", "640",
         "--train-eval-samples", "200", "--attack-bn", "train", "--awp-gamma", "0", "--epochs", "150"]


def _with(base, **kw):
    """``base`` with options replaced/added: ``_with(b, eps="0.25")`` sets ``--eps 0.25``."""
    out = list(base)
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is True:  # a switch
            out += [] if flag in out else [flag]
        elif flag in out:
            i = out.index(flag)
            out[i + 1] = str(v)
        else:
            out += [flag, str(v)]
    return out


_N320 = _with(_BASE, train_samples=320, batch_size=32, epochs=100, eps_warmup=10)
CANDIDATES = {
    "promising": _BASE,
    # 320 images, batch 32 (10 steps per epoch), 100 epochs, eps ramped over 10 epochs
    "n320-e20-n20": _with(_N320, eps="0.2", alpha="0.05", label_noise="0.2"),
    "n320-e20-wd0": _with(_N320, eps="0.2", alpha="0.05", weight_decay="0"),
    "n320-e15-n20": _with(_N320, label_noise="0.2"),
    "n640-e15-n20": _with(_BASE, epochs=100, eps_warmup=10, label_noise="0.2"),
}
CANDIDATES["n320-e15-n30"] = _with(_N320, label_noise="0.3")  # more label noise
CANDIDATES["n320-e15-n20-long"] = _with(_N320, label_noise="0.2", epochs=200)  # twice the epochs after the decay
# the issue-14 arms in the "n320-e15-n20-long" regime (plain AT loses >= 3 points of test PGD-20 after its
# peak there): AT-AWP with the train-mode attack at three gammas, TRADES (beta 6) and TRADES-AWP
# (gamma 0.005) with the eval-mode attack of the reference TRADES code; AWP after a 10-epoch warm-up (the
# eps ramp's length) in every AWP arm
_REGIME = CANDIDATES["n320-e15-n20-long"]
for _g in ("0.0025", "0.005", "0.01"):
    CANDIDATES[f"long-awp{_g}"] = _with(_REGIME, awp_gamma=_g, awp_warmup=10)
# the same AT and AT-AWP (gamma 0.01) runs with --track-flatness (the flatness beside the robust gap)
CANDIDATES["long-flat"] = _with(_REGIME, track_flatness=True)
CANDIDATES["long-awp0.01-flat"] = _with(_REGIME, awp_gamma="0.01", awp_warmup=10, track_flatness=True)
CANDIDATES["long-trades"] = _with(_REGIME, method="trades", beta=6, attack_bn="eval")
CANDIDATES["long-trades-awp"] = _with(_REGIME, method="trades", beta=6, attack_bn="eval", awp_gamma="0.005",
                                      awp_warmup=10)
# the issue-18 cheap ascents of AT-AWP g0.01 (compared with "long-awp0.01", the separate ascent): the
# direction from the regime's train-mode attack's last step, and the separate ascent every 2 / 4 steps;
# then the attack-sourced direction from an eval-mode attack, beside exact AT-AWP with that attack
_AWP01 = CANDIDATES["long-awp0.01"]
CANDIDATES["long-awp0.01-attack"] = _with(_AWP01, awp_ascent="attack")
CANDIDATES["long-awp0.01-every2"] = _with(_AWP01, awp_every=2)
CANDIDATES["long-awp0.01-every4"] = _with(_AWP01, awp_every=4)
CANDIDATES["long-awp0.01-evalbn"] = _with(_AWP01, attack_bn="eval")
CANDIDATES["long-awp0.01-evalbn-attack"] = _with(_AWP01, attack_bn="eval", awp_ascent="attack")


def _run_one(options, eval_every: int) -> None:
    """Run awpfast.train.run in this process, evaluating every ``eval_every`` epochs."""
    import awpfast.train as T
    from awpfast.train import loop

    args = T.build_parser().parse_args(options)
    epochs = args.epochs
    if eval_every > 1:
        real_eval = loop.evaluate_epoch

        def sparse_eval(t, epoch=None):
            epoch = len(t.history) if epoch is None else epoch  # 0-based
            if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
                return real_eval(t, epoch)
            nan = {k: math.nan for k in ("val_clean_acc", "val_robust_acc", "train_clean_acc", "train_robust_acc",
                                         "test_clean_acc", "test_robust_acc", "test_clean_loss", "test_robust_loss")}
            return dict(nan, eval_time_s=0.0)

        loop.evaluate_epoch = sparse_eval  # the loop module calls it
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


def curve(run: str) -> None:
    """The evaluated epochs of one run: LR, loss, train eps, val / test / train PGD-20, test clean, flatness."""
    h = load(os.path.join(RUNS, run))
    f = lambda v: "  -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.1f}"  # noqa: E731
    print("epoch  lr      loss   eps    val   test  train  clean  flatness")
    for r in h:
        if r.get("test_robust_acc") is None or math.isnan(r["test_robust_acc"]):
            continue
        fl = r.get("flatness")
        print(f"{r['epoch']:5d}  {r['lr']:.4f} {r['train_loss']:.3f}  {r.get('train_eps', float('nan')):.3f}  "
              f"{f(r.get('val_robust_acc'))}  {f(r['test_robust_acc'])}  {f(r.get('train_robust_acc'))}  "
              f"{f(r['test_clean_acc'])}  {'' if fl is None else f'{fl:.3f}'}")


STUDY_ARMS = {"AT": "n320-e15-n20-long", "AT-AWP g0.0025": "long-awp0.0025", "AT-AWP g0.005": "long-awp0.005",
              "AT-AWP g0.01": "long-awp0.01", "TRADES": "long-trades", "TRADES-AWP g0.005": "long-trades-awp"}


def _base_arm(arm):
    """The arm an AWP arm is compared with: TRADES for TRADES-AWP, AT otherwise."""
    return "TRADES" if arm.startswith("TRADES") else "AT"


def _ms(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    m = sum(vals) / len(vals)
    sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return {"mean": m, "std": sd, "n": len(vals), "values": vals}


FLATNESS_RUNS = {"AT": "long-flat-s0", "AT-AWP g0.01": "long-awp0.01-flat-s0"}


def flatness_runs(out_prefix) -> dict:
    """The --track-flatness runs (seed 0 of AT and AT-AWP g0.01, same trajectories as the study's): per
    evaluated epoch the flatness and the robust gap, their Pearson and Spearman correlations, and each
    run's metrics plot as ``OUT_PREFIX_flatness_<arm>.png``."""
    out = {}
    for arm, run in FLATNESS_RUNS.items():
        d = os.path.join(RUNS, run)
        if not os.path.isfile(os.path.join(d, "done.json")):
            continue
        ev = [r for r in load(d) if r.get("flatness") is not None and not math.isnan(r["test_robust_acc"])]
        fl = [r["flatness"] for r in ev]
        gap = [100 * (r["train_robust_acc"] - r["test_robust_acc"]) for r in ev]

        def pearson(a, b):
            ma, mb = sum(a) / len(a), sum(b) / len(b)
            cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
            return cov / (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5

        def ranks(a):
            order = sorted(range(len(a)), key=lambda i: a[i])
            r = [0.0] * len(a)
            for k, i in enumerate(order):
                r[i] = float(k)
            return r

        out[arm] = {"run": run, "epochs": [r["epoch"] for r in ev], "flatness": fl, "robust_gap": gap,
                    "pearson": pearson(fl, gap), "spearman": pearson(ranks(fl), ranks(gap)),
                    "last_flatness": fl[-1], "last_gap": gap[-1], "last_test_pgd20": 100 * ev[-1]["test_robust_acc"]}
        import awpfast.train as T
        slug = arm.lower().replace(" ", "_").replace(".", "")
        T.plot_metrics(ev, f"{out_prefix}_flatness_{slug}.png", title=f"{arm}, seed 0 (evaluated epochs)")
        print(f"{arm}: flatness vs robust gap over {len(ev)} evaluations: Pearson {out[arm]['pearson']:.2f}, "
              f"Spearman {out[arm]['spearman']:.2f}; last flatness {fl[-1]:.3f}, last gap {gap[-1]:.1f}")
    return out


def study(seeds, out_prefix) -> None:
    """Per arm of STUDY_ARMS, over ``seeds``: best / last / drop / mean of the last 4 evaluations / last
    clean / last train PGD-20 / robust gap (train - test PGD-20, last epoch), and the paired differences
    (same seed) of the last, the tail mean and the gap to the arm's base (AT, or TRADES for
    TRADES-AWP), with their t statistics. Prints markdown, writes
    ``OUT_PREFIX.json`` and ``OUT_PREFIX.png`` (mean test PGD-20 and robust gap per evaluated epoch)."""
    per = {}
    for arm, name in STUDY_ARMS.items():
        rows = {}
        for seed in seeds:
            d = os.path.join(RUNS, f"{name}-s{seed}")
            if os.path.isfile(os.path.join(d, "done.json")):
                h = load(d)
                st = stats(h)
                st["gap"] = st["last_train_pgd"] - st["last"]
                st["curve"] = [(r["epoch"], 100 * r["test_robust_acc"], 100 * r["train_robust_acc"])
                               for r in h if not math.isnan(r["test_robust_acc"])]
                rows[seed] = st
        per[arm] = rows
    keys = ("best", "last", "drop", "tail_mean", "last_clean", "last_train_pgd", "gap")
    table = {arm: {k: _ms([r[k] for r in rows.values()]) for k in keys} for arm, rows in per.items() if rows}
    for arm, rows in per.items():
        if arm in ("AT", "TRADES") or not rows:
            continue
        base_name = _base_arm(arm)
        base = per.get(base_name, {})
        table[arm]["paired_base"] = base_name
        for k in ("last", "tail_mean", "gap"):
            diffs = [rows[s][k] - base[s][k] for s in rows if s in base]
            d = _ms(diffs)
            if d and d["n"] > 1 and d["std"] > 0:
                d["t"] = d["mean"] / (d["std"] / d["n"] ** 0.5)
            table[arm][f"paired_{k}_vs_base"] = d
    f = lambda m: "–" if m is None else f"{m['mean']:.1f} ± {m['std']:.1f}"  # noqa: E731
    print(f"| arm (seeds {' '.join(map(str, seeds))}) | best test PGD-20 | last | best − last | mean last 4 evals | "
          "last clean | last train PGD-20 | robust gap |")
    print("|---|---|---|---|---|---|---|---|")
    for arm, t in table.items():
        n = t["best"]["n"] if t.get("best") else 0
        print(f"| {arm} (n={n}) | " + " | ".join(f(t[k]) for k in keys) + " |")
    print("\n| arm − its base (paired by seed) | last | t | mean last 4 evals | t | robust gap | t |")
    print("|---|---|---|---|---|---|---|")
    for arm, t in table.items():
        if "paired_base" not in t:
            continue
        cells = []
        for k in ("last", "tail_mean", "gap"):
            d = t.get(f"paired_{k}_vs_base")
            cells += [f(d), f"{d['t']:.2f}" if d and "t" in d else "–"]
        print(f"| {arm} − {t['paired_base']} | " + " | ".join(cells) + " |")
    result = {"regime": CANDIDATES[STUDY_ARMS["AT"]], "arms": {a: CANDIDATES[n][len(CANDIDATES[STUDY_ARMS['AT']]):]
                                                              for a, n in STUDY_ARMS.items()},
              "eval_every": 5, "seeds": seeds, "table": table,
              "runs": {arm: {str(s): {k: v for k, v in r.items() if k != "curve"} for s, r in rows.items()}
                       for arm, rows in per.items()}}
    result["flatness"] = flatness_runs(out_prefix)
    with open(out_prefix + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (arm, rows) in enumerate(per.items()):
        if not rows:
            continue
        curves = [r["curve"] for r in rows.values()]
        n = min(len(c) for c in curves)
        ep = [curves[0][j][0] for j in range(n)]
        te = [sum(c[j][1] for c in curves) / len(curves) for j in range(n)]
        gap = [sum(c[j][2] - c[j][1] for c in curves) / len(curves) for j in range(n)]
        a1.plot(ep, te, f"C{i}-", label=arm)
        a2.plot(ep, gap, f"C{i}-", label=arm)
    a1.set_title("test PGD-20 (%), mean over seeds"), a1.set_xlabel("epoch"), a1.grid(alpha=0.3), a1.legend()
    a2.set_title("robust gap: train − test PGD-20 (points)"), a2.set_xlabel("epoch"), a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_prefix + ".png", dpi=110)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        name, seed, out, eval_every = argv[1], int(argv[2]), argv[3], int(argv[4])
        _run_one(CANDIDATES[name] + ["--seed", str(seed), "--out", out, "--threads", "1", "--no-progress",
                                     "--no-plot", "--overwrite"], eval_every)
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
    c = sub.add_parser("curve")
    c.add_argument("run")
    st = sub.add_parser("study", help="the issue-14 arms table, JSON and plot")
    st.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    st.add_argument("--out", default=os.path.join(ROOT, "docs", "reproduction_regime"))
    a = p.parse_args(argv)
    if a.cmd == "study":
        study(a.seeds, a.out)
        return
    if a.cmd == "list":
        for k, opts in CANDIDATES.items():
            print(k, " ".join(opts))
    elif a.cmd == "curve":
        curve(a.run)
    elif a.cmd == "run":
        launch(a.names, a.seeds, a.jobs, a.eval_every, a.force)
        summary(a.names)
    else:
        summary(a.names)


if __name__ == "__main__":
    main()
