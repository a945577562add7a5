"""The multi-seed study behind docs/continual.md.

    python -m awpfast.continual.study --preset quick --seeds 0 1 2 --out docs/continual

Runs every method for every seed, one after the other on one thread, writing one JSON per
run (``{preset}_{dataset}{tag}_{method}_s{seed}.json``; a run whose JSON exists is read back,
not redone, so an interrupted study resumes), then a summary JSON, a markdown table
(mean +- sample std over seeds) and a figure (mean accuracy matrix per method).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

from .learner import BASES, METHODS, SOFT
from .run import PRESETS, run_experiment

__all__ = ["run_study", "summarize", "main"]


def _name(preset, dataset, method, seed, tag=""):
    return f"{preset}_{dataset}{tag}_{method}_s{seed}.json"


def run_study(preset, seeds, methods=METHODS, out=".", dataset=None, mnist_path=None, overwrite=False,
              tag="", **overrides):
    """Run (or read back) every (method, seed); returns {method: [result, ...]}."""
    ds = dataset or PRESETS[preset]["dataset"]
    results = {}
    for m in methods:
        for s in seeds:
            path = os.path.join(out, _name(preset, ds, m, s, tag))
            if os.path.exists(path) and not overwrite:
                with open(path) as f:
                    r = json.load(f)
            else:
                r = run_experiment(m, preset, s, dataset=ds, mnist_path=mnist_path, **overrides)
                with open(path + ".tmp", "w") as f:
                    json.dump(r, f, indent=1)
                os.replace(path + ".tmp", path)
            print(f"{preset} {ds} {m} seed {s}: ACC {r['acc']:.2f} BWT {r['bwt']:.2f} ({r['seconds']:.0f} s)",
                  file=sys.stderr)
            results.setdefault(m, []).append(r)
    return results


def _ms(vals):
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return mean, std


def summarize(results) -> dict:
    """Per method: mean/std of ACC, BWT and seconds over seeds, the mean accuracy matrix, memory."""
    out = {}
    for m, rs in results.items():
        acc, bwt, sec = (_ms([r[k] for r in rs]) for k in ("acc", "bwt", "seconds"))
        T = len(rs[0]["acc_matrix"])
        mean_A = [[statistics.fmean(r["acc_matrix"][i][j] for r in rs) for j in range(T)] for i in range(T)]
        out[m] = {"acc_mean": acc[0], "acc_std": acc[1], "bwt_mean": bwt[0], "bwt_std": bwt[1],
                  "seconds_mean": sec[0], "seeds": [r["seed"] for r in rs], "acc_matrix_mean": mean_A,
                  "memory_bytes": rs[0]["memory_bytes"], "final_basis_sizes": rs[0]["basis_sizes"][-1:] or None,
                  "soft_weight_min": min((v for r in rs for v in r["soft_weights"]["min_per_task"]), default=None)}
    return out


def table(summary, title) -> str:
    """A markdown table of a summary."""
    lines = [f"**{title}**", "", "| method | ACC % | BWT % | time / run (s) | memory (bases + replay, KiB) |",
             "| --- | --- | --- | --- | --- |"]
    for m, s in summary.items():
        mem = s["memory_bytes"]
        lines.append(f"| {m} | {s['acc_mean']:.2f} ± {s['acc_std']:.2f} | {s['bwt_mean']:.2f} ± {s['bwt_std']:.2f} "
                     f"| {s['seconds_mean']:.0f} | {(mem['bases'] + mem['soft_weights']) / 1024:.0f} + "
                     f"{mem['replay'] / 1024:.0f} |")
    return "\n".join(lines)


def plot(summary, path, title):
    """Mean accuracy matrix of every method, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(summary)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.4), squeeze=False)
    for ax, (m, s) in zip(axes[0], summary.items()):
        im = ax.imshow(s["acc_matrix_mean"], vmin=0, vmax=100, cmap="viridis")
        ax.set_title(f"{m}\nACC {s['acc_mean']:.1f}  BWT {s['bwt_mean']:.1f}", fontsize=9)
        ax.set_xlabel("task evaluated")
    axes[0][0].set_ylabel("after training task")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="accuracy %")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    """CLI: run the study, write summary JSON, table and figure."""
    p = argparse.ArgumentParser(prog="python -m awpfast.continual.study", allow_abbrev=False)
    p.add_argument("--preset", choices=tuple(PRESETS), default="quick")
    p.add_argument("--dataset", choices=("digits", "mnist"))
    p.add_argument("--mnist-csv", metavar="PATH")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--out", default="docs/continual")
    p.add_argument("--tag", default="", help="suffix of the summary files (for ablations)")
    p.add_argument("--overwrite", action="store_true", help="redo runs whose JSON exists")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lam-init", type=float)
    p.add_argument("--tau", type=float)
    p.add_argument("--basis", choices=BASES)
    p.add_argument("--fixed-lambda", action="store_true")
    p.add_argument("--protocol", choices=("fs-dgpm", "gpm"), default="fs-dgpm")
    p.add_argument("--soft", choices=SOFT)
    p.add_argument("--lam-floor", type=float)
    p.add_argument("--thres", type=float, nargs="+")
    p.add_argument("--thres-add", type=float)
    args = p.parse_args(argv)
    if not os.path.isdir(args.out):
        print(f"error: folder {args.out!r} does not exist; create it first", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    overrides = {k: getattr(args, k) for k in ("lam_init", "tau", "basis", "soft", "lam_floor")
                 if getattr(args, k) is not None}
    if args.protocol != "fs-dgpm":
        overrides["protocol"] = args.protocol
    if args.thres is not None:
        overrides["thres"] = args.thres[0] if len(args.thres) == 1 else tuple(args.thres)
    if args.thres_add is not None:
        overrides["thres_add"] = args.thres_add
    if args.fixed_lambda:
        overrides["learn_lambda"] = False
    try:
        res = run_study(args.preset, args.seeds, args.methods, args.out, args.dataset, args.mnist_csv,
                        args.overwrite, args.tag, **overrides)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ds = args.dataset or PRESETS[args.preset]["dataset"]
    summ = summarize(res)
    stem = os.path.join(args.out, f"summary_{args.preset}_{ds}{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(summ, f, indent=1)
    title = f"{args.preset} preset, permuted {ds}, {len(args.seeds)} seeds{args.tag}"
    md = table(summ, title)
    with open(stem + ".md", "w") as f:
        f.write(md + "\n")
    plot(summ, stem + ".png", title)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
