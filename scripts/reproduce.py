"""Small reproduction of AWP's central claim: AWP narrows robust overfitting.

AT against AT-AWP (gamma 0.01) on the embedded digits data, same budget (epochs, schedule,
attack, model) for both, over several seeds. Each run is ``python -m awpfast.train`` with
the options below; afterwards this script collects best / last test PGD-20 accuracy and the
robust generalization gap (train PGD-20 - test PGD-20 at the last epoch) into
``docs/reproduction.json`` and ``docs/reproduction.png`` and prints a markdown table.

    python scripts/reproduce.py                      # 3 seeds x {AT, AT-AWP}, 2 runs at a time
    python scripts/reproduce.py --aggregate-only     # rebuild table/plot from runs/reproduce
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BASE = ["--data", "digits", "--image-size", "8", "--method", "at", "--eps", "0.15", "--alpha", "0.0375",
         "--attack-steps", "10", "--eval-steps", "20", "--lr", "0.05", "--lr-schedule", "piecewise",
         "--batch-size", "128", "--threads", "1", "--no-progress", "--no-plot"]
# "base": the full 1 297-image training split, SmallCNN width 16, 40 epochs.
# "overfit": 400 training images and a wider SmallCNN (width 32) for 60 epochs: more capacity per
#            training example, the regime in which robust overfitting shows up. AT-AWP from
#            scratch stayed at chance there (seed 0: loss 2.30 for 26 epochs), so AWP starts after
#            a 5-epoch warm-up, as the reference does for TRADES-AWP.
PRESETS = {
    "base": {"options": _BASE + ["--model", "small-cnn", "--width", "16", "--train-eval-samples", "300"],
             "epochs": 40, "awp_warmup": 0, "title": "1297 train images, SmallCNN-16"},
    "overfit": {"options": _BASE + ["--model", "small-cnn", "--width", "32", "--train-samples", "400",
                                    "--train-eval-samples", "200"],
                "epochs": 60, "awp_warmup": 5, "title": "400 train images, SmallCNN-32"},
}
COMMON = PRESETS["base"]["options"]
ARMS = {"AT": ["--awp-gamma", "0"], "AT-AWP": ["--awp-gamma", "0.01", "--awp-warmup", "0"]}


def arms(args):
    w = str(PRESETS[args.preset]["awp_warmup"])
    return {"AT": ARMS["AT"], "AT-AWP": ["--awp-gamma", str(args.gamma), "--awp-warmup", w]}


def run_dir(base, arm, seed, gamma=0.01):
    g = "" if (arm == "AT" or gamma == 0.01) else f"-g{gamma:g}"
    return os.path.join(base, f"{arm.lower()}{g}-s{seed}")


def _suffix(args):
    return ("" if args.preset == "base" else f"_{args.preset}") + ("" if args.gamma == 0.01 else f"_g{args.gamma:g}")


def launch(args):
    jobs = []
    for seed in args.seeds:
        for arm, extra in arms(args).items():
            out = run_dir(args.runs, arm, seed, args.gamma)
            if os.path.isfile(os.path.join(out, "metrics.jsonl")) and not args.force:
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    if sum(1 for _ in f) >= args.epochs:
                        continue
            cmd = [sys.executable, "-m", "awpfast.train", *PRESETS[args.preset]["options"], *extra, "--epochs", str(args.epochs),
                   "--seed", str(seed), "--out", out]
            jobs.append((arm, seed, cmd, out))
    running = []
    while jobs or running:
        while jobs and len(running) < args.jobs:
            arm, seed, cmd, out = jobs.pop(0)
            os.makedirs(out, exist_ok=True)
            print(f"start {arm} seed {seed}: {' '.join(cmd[1:])}", flush=True)
            log = open(os.path.join(out, "train.log"), "w")
            running.append((subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), arm, seed, log))
        time.sleep(2)
        for item in list(running):
            p, arm, seed, log = item
            if p.poll() is not None:
                log.close()
                running.remove(item)
                print(f"done  {arm} seed {seed} (exit {p.returncode})", flush=True)
                if p.returncode != 0:
                    raise SystemExit(f"{arm} seed {seed} failed; see {run_dir(args.runs, arm, seed, args.gamma)}/train.log")


def load(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def aggregate(args):
    per_run, table = {}, {}
    for arm in ARMS:
        rows = []
        for seed in args.seeds:
            h = load(run_dir(args.runs, arm, seed, args.gamma))
            best = max(h, key=lambda r: r["test_robust_acc"])
            last = h[-1]
            rows.append({"seed": seed, "epochs": len(h), "best_epoch": best["epoch"],
                         "best_test_pgd20": best["test_robust_acc"], "last_test_pgd20": last["test_robust_acc"],
                         "best_minus_last": best["test_robust_acc"] - last["test_robust_acc"],
                         "last_test_clean": last["test_clean_acc"], "last_train_pgd20": last["train_robust_acc"],
                         "robust_gap": last["train_robust_acc"] - last["test_robust_acc"],
                         "train_time_s": sum(r["train_time_s"] for r in h)})
            per_run[f"{arm} s{seed}"] = h
        table[arm] = rows

    def ms(vals):
        m = statistics.mean(vals)
        s = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return m, s

    summary = {}
    for arm, rows in table.items():
        summary[arm] = {k: ms([r[k] for r in rows]) for k in
                        ("best_test_pgd20", "last_test_pgd20", "best_minus_last", "last_test_clean",
                         "last_train_pgd20", "robust_gap")}
    cmd = "python scripts/reproduce.py " + " ".join(
        (["--preset", args.preset] if args.preset != "base" else [])
        + (["--epochs", str(args.epochs)] if args.epochs != PRESETS[args.preset]["epochs"] else [])
        + (["--gamma", f"{args.gamma:g}"] if args.gamma != 0.01 else [])
        + (["--seeds", *map(str, args.seeds)] if args.seeds != [0, 1, 2] else []))
    result = {"command": cmd.strip(), "preset": args.preset, "train_options": PRESETS[args.preset]["options"], "arms": arms(args), "epochs": args.epochs,
              "seeds": args.seeds, "runs": table, "summary_mean_std": summary}
    os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
    with open(os.path.join(ROOT, "docs", f"reproduction{_suffix(args)}.json"), "w") as f:
        json.dump(result, f, indent=1)

    pct = lambda ms_: f"{100 * ms_[0]:.2f} ± {100 * ms_[1]:.2f}"  # noqa: E731
    lines = ["| | best test PGD-20 | last test PGD-20 | best − last | last test clean | last train PGD-20 | "
             "robust gap (train − test, last) |", "|---|---|---|---|---|---|---|"]
    for arm, s in summary.items():
        lines.append(f"| {arm} | {pct(s['best_test_pgd20'])} | {pct(s['last_test_pgd20'])} | "
                     f"{pct(s['best_minus_last'])} | {pct(s['last_test_clean'])} | {pct(s['last_train_pgd20'])} | "
                     f"{pct(s['robust_gap'])} |")
    lines += ["", "| run | best epoch | best test PGD-20 | last test PGD-20 | last test clean | robust gap |",
              "|---|---|---|---|---|---|"]
    for arm, rows in table.items():
        for r in rows:
            lines.append(f"| {arm} seed {r['seed']} | {r['best_epoch']} | {100 * r['best_test_pgd20']:.2f} | "
                         f"{100 * r['last_test_pgd20']:.2f} | {100 * r['last_test_clean']:.2f} | "
                         f"{100 * r['robust_gap']:.2f} |")
    text = "\n".join(lines)
    result["markdown_table"] = text
    with open(os.path.join(ROOT, "docs", f"reproduction{_suffix(args)}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return result
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, arm in zip(axes, ARMS):
        for i, seed in enumerate(args.seeds):
            h = per_run[f"{arm} s{seed}"]
            ep = [r["epoch"] for r in h]
            kw = dict(alpha=0.85, lw=1.2)
            ax.plot(ep, [100 * r["train_robust_acc"] for r in h], "C1--", label="train PGD-20" if i == 0 else None, **kw)
            ax.plot(ep, [100 * r["test_robust_acc"] for r in h], "C3-", label="test PGD-20" if i == 0 else None, **kw)
            ax.plot(ep, [100 * r["test_clean_acc"] for r in h], "C0-", label="test clean" if i == 0 else None,
                    alpha=0.5, lw=0.8)
        ax.set_title(f"{arm}{'' if arm == 'AT' else f' (gamma {args.gamma:g})'}, {len(args.seeds)} seeds")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    axes[0].set_ylabel("accuracy (%)")
    fig.suptitle(f"digits ({PRESETS[args.preset]['title']}), L-inf eps = 0.15, PGD-10 training, "
                 f"{args.epochs} epochs, piecewise LR (x0.1 at 50%, 75%)")
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs", f"reproduction{_suffix(args)}.png"), dpi=100)
    plt.close(fig)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="base")
    p.add_argument("--gamma", type=float, default=0.01, help="AWP gamma of the AT-AWP arm")
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's (base 40, overfit 60)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each uses one thread)")
    p.add_argument("--runs", default=None, help="default runs/reproduce[-PRESET]")
    p.add_argument("--force", action="store_true", help="rerun finished runs")
    p.add_argument("--aggregate-only", action="store_true")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = PRESETS[args.preset]["epochs"]
    if args.runs is None:
        args.runs = os.path.join(ROOT, "runs", "reproduce" + ("" if args.preset == "base" else f"-{args.preset}"))
    if not args.aggregate_only:
        launch(args)
    aggregate(args)


if __name__ == "__main__":
    main()
