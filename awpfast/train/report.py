"""What a run reports: the metrics lines it prints, ``metrics.jsonl`` and the ``metrics.png`` plot.

Plain functions of the run's options and its history (a list of per-epoch dicts); imports neither
the configuration nor the loop.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

from ..cli import atomic_write_text
from ..cli import note as _cli_note
from ..errors import deferred_interrupts

__all__ = ["note", "start_line", "epoch_line", "done_line", "write_metrics", "plot_metrics", "plot_title",
           "write_outputs", "repair_outputs", "metrics_text"]

PROG = "awpfast-train"


def note(msg: str) -> None:
    """``awpfast-train: note: MSG`` on stderr."""
    _cli_note(PROG, msg)


def _pct(v) -> str:
    return "  -  " if v is None else f"{100 * v:.2f}"


def _awp_text(args) -> str:
    """`` + AWP(gamma=..., ascent ...) from epoch N`` for the start line; empty without AWP."""
    if not args.awp_gamma > 0:
        return ""
    parts = [f"gamma={args.awp_gamma:g}"]
    ascent = getattr(args, "awp_ascent", "separate")
    fraction = getattr(args, "awp_ascent_fraction", 1.0)
    parts.append(f"ascent {ascent}" + (f" on {fraction:g} of the batch" if fraction < 1 else ""))
    if getattr(args, "awp_every", 1) > 1:
        parts.append(f"every {args.awp_every} steps")
    if getattr(args, "awp_steps", 1) > 1:
        parts.append(f"{args.awp_steps} steps")
    warm = getattr(args, "awp_warmup", 0)
    when = "" if not warm else (f" from epoch {warm + 1}" if warm < args.epochs else " never (warm-up >= epochs)")
    return f" + AWP({', '.join(parts)}){when}"


def start_line(args, train_split, val_split, ds, cfg) -> str:
    """The run's first line: method, model, data sizes, threat model, device, output folder."""
    return (f"awpfast-train: {args.method}{_awp_text(args)}"
            + (f" [recipe {args.recipe}]" if args.recipe else "")
            + (f" [extra data {os.path.basename(args.extra_data)}, {args.extra_fraction:g} of each batch]"
               if getattr(args, "extra_data", None) else "")
            + (f" [label noise {args.label_noise:g}]" if args.label_noise else "") + " | "
            f"{args.model} on {args.data} ({len(train_split)} train / {len(val_split)} val / {len(ds.test)} test, "
            f"{ds.image_size}px) | {args.norm} eps={args.eps:.4g} alpha={args.alpha:.4g}"
            + (f" (ramped over {args.eps_warmup} epochs)" if args.eps_warmup else "") + f" | {cfg.device}"
            + (f" x {cfg.dist.world_size} ({cfg.dist.mode})" if cfg.dist.enabled else "") + f" | out={args.out}")


def epoch_line(rec: dict, args, is_best: bool) -> str:
    """One epoch's line (``rec``: the epoch's ``metrics.jsonl`` record)."""
    return (f"epoch {rec['epoch']:3d}/{args.epochs} lr {rec['lr']:.4g} loss {rec['train_loss']:.4f} | "
            f"val PGD-{args.eval_steps} {_pct(rec['val_robust_acc'])} | "
            f"train clean {_pct(rec['train_clean_acc'])} PGD {_pct(rec['train_robust_acc'])} | "
            f"test clean {_pct(rec['test_clean_acc'])} PGD {_pct(rec['test_robust_acc'])} | "
            + (f"flatness {rec['flatness']:.4f} ({rec['flatness_time_s']:.1f}s) | "
               if rec.get("flatness") is not None else "")
            + f"{rec['img_per_s']:.0f} img/s, {rec['train_time_s']:.1f}s + eval {rec['eval_time_s']:.1f}s"
            + ("  *best" if is_best else ""))


def done_line(best: dict, last: dict, args) -> str:
    """The closing line: the best (selected) epoch and the last one."""
    return (f"done: best epoch {best['epoch']} (by {best['selected_on']} PGD-{args.eval_steps}): test clean "
            f"{_pct(best['test_clean_acc'])}% PGD-{args.eval_steps} {_pct(best['test_robust_acc'])}% | last epoch "
            f"{last['epoch']}: test clean {_pct(last['test_clean_acc'])}% PGD-{args.eval_steps} "
            f"{_pct(last['test_robust_acc'])}% | {args.out}")


def metrics_text(history) -> str:
    """The text of ``metrics.jsonl`` for ``history``: one JSON object per epoch."""
    return "".join(json.dumps(h) + "\n" for h in history)


def write_metrics(path: str, history) -> None:
    """``metrics.jsonl``, written atomically."""
    atomic_write_text(path, metrics_text(history))


def plot_title(args) -> str:
    return (f"{args.method}{'-AWP' if args.awp_gamma > 0 else ''} {args.model} {args.data} seed {args.seed}"
            + (f" ({args.recipe})" if args.recipe else "") + (f" noise {args.label_noise:g}" if args.label_noise else ""))


def write_outputs(history, args) -> None:
    """``metrics.jsonl`` and (unless ``--no-plot``) ``metrics.png`` of ``history`` in ``args.out``."""
    write_metrics(os.path.join(args.out, "metrics.jsonl"), history)
    if not args.no_plot:
        plot_metrics(history, os.path.join(args.out, "metrics.png"), title=plot_title(args))


def repair_outputs(history, args) -> List[str]:
    """Rebuild ``metrics.jsonl`` (and the plot) from ``history`` (``last.pt``'s, the commit point) when the
    file does not hold exactly it, or redraw a plot older than the metrics; returns what was rebuilt."""
    done = []
    mp, png = os.path.join(args.out, "metrics.jsonl"), os.path.join(args.out, "metrics.png")
    try:
        with open(mp) as f:
            same = f.read() == metrics_text(history)
    except OSError:
        same = False
    if not same:
        write_metrics(mp, history)
        done.append(f"metrics.jsonl rebuilt from last.pt's history ({len(history)} epochs)")
    if not args.no_plot and history and (not same or not os.path.exists(png)
                                         or os.path.getmtime(png) < os.path.getmtime(mp)):
        if plot_metrics(history, png, title=plot_title(args)) is not None:
            done.append("metrics.png redrawn")
    return done


def plot_metrics(history, path: str, title: str = "") -> Optional[str]:
    """Train/test clean and robust accuracy per epoch (and train loss) to a PNG; with
    ``--track-flatness`` a third panel shows the flatness next to the robust generalization gap
    (train PGD accuracy - test PGD accuracy, in points)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    ep = [h["epoch"] for h in history]
    flat = [h for h in history if h.get("flatness") is not None]
    fig, axes = plt.subplots(1, 3 if flat else 2, figsize=(16.5 if flat else 11, 4))
    ax, ax2 = axes[0], axes[1]
    curves = (("train_clean_acc", "train clean", "C0--"), ("train_robust_acc", "train PGD", "C1--"),
              ("test_clean_acc", "test clean", "C0-"), ("test_robust_acc", "test PGD", "C1-"),
              ("val_robust_acc", "val PGD", "C2:"))
    for key, lab, st in curves:
        pts = [(h["epoch"], 100 * h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], st, label=lab)
    if history:
        key = "val_robust_acc" if history[-1].get("val_robust_acc") is not None else "test_robust_acc"
        scored = [h for h in history if h.get(key) is not None]  # --eval-every leaves gaps
        if scored:
            ax.axvline(max(scored, key=lambda h: h[key])["epoch"], color="0.7", lw=0.8)
    ax.set_xlabel("epoch"), ax.set_ylabel("accuracy (%)"), ax.legend(), ax.grid(alpha=0.3)
    ax.set_title(title or "accuracy")
    ax2.plot(ep, [h["train_loss"] for h in history], "C2-", label="train loss")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("loss"), ax2.grid(alpha=0.3), ax2.legend()
    if flat:
        ax3 = axes[2]
        ax3.plot([h["epoch"] for h in flat], [h["flatness"] for h in flat], "C3-o", ms=3,
                 label="flatness: PGD loss rise at alpha")
        ax3.set_xlabel("epoch"), ax3.set_ylabel("flatness (loss increase)", color="C3"), ax3.grid(alpha=0.3)
        gap = [(h["epoch"], 100 * (h["train_robust_acc"] - h["test_robust_acc"])) for h in history
               if h.get("train_robust_acc") is not None and h.get("test_robust_acc") is not None]
        lines, labels = ax3.get_legend_handles_labels()
        if gap:
            ax4 = ax3.twinx()
            ax4.plot([g[0] for g in gap], [g[1] for g in gap], "C4--", label="robust gap: train - test PGD")
            ax4.set_ylabel("robust generalization gap (points)", color="C4")
            more = ax4.get_legend_handles_labels()
            lines, labels = lines + more[0], labels + more[1]
        ax3.legend(lines, labels, loc="upper left", fontsize=8)
        ax3.set_title("flatness and robust generalization gap")
    fig.tight_layout()
    with deferred_interrupts():  # Ctrl-C / SIGTERM wait for the file
        fig.savefig(path + ".tmp", dpi=100, format="png")
        plt.close(fig)
        os.replace(path + ".tmp", path)
    return path
