"""``python -m awpfast.landscape``: the weight loss landscape of ``awpfast-train`` checkpoints, as JSON
and a PNG (the library functions are in :mod:`awpfast.landscape`)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from typing import List, Optional

import torch

from ..checkpoint import read_checkpoint
from ..cli import (USAGE_ERRORS, ArgumentParser, HelpFormatter, UsageError, check_out_dir, cli_main, parse_float,
                   resolve_device)
from . import LANDSCAPE_FORMAT, filter_normalized_direction, weight_landscape

__all__ = ["parse_alphas", "build_parser", "load_checkpoint", "run", "plot_landscape", "main"]


def parse_alphas(spec: str) -> List[float]:
    """``"-1:1:21"`` (start:stop:points, both ends included) or ``"-1,-0.5,0,0.5,1"``."""
    s = str(spec).strip()
    try:
        if ":" in s:
            parts = s.split(":")
            if len(parts) != 3:
                raise ValueError
            lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise UsageError(f"--alphas {s!r}: start and stop must be finite numbers")
            if n < 2 or hi <= lo:
                raise UsageError(f"--alphas {s!r}: need start < stop and at least 2 points, e.g. -1:1:21")
            vals = [lo + (hi - lo) * k / (n - 1) for k in range(n)]
            if n % 2 == 1 and lo == -hi:
                vals[n // 2] = 0.0  # the centre exactly, not 1e-17
            return vals
        vals = [float(t) for t in s.split(",") if t.strip()]
    except UsageError:
        raise
    except ValueError:
        raise UsageError(f"--alphas {s!r} is not a range START:STOP:POINTS (e.g. -1:1:21) nor a comma list "
                       "(e.g. -1,-0.5,0,0.5,1)") from None
    if not vals or not all(math.isfinite(v) for v in vals):
        raise UsageError(f"--alphas {s!r}: give finite numbers, e.g. -1:1:21")
    return vals


PROG = "python -m awpfast.landscape"
_OUT_MISSING = (f"--out DIR is missing: name the folder for landscape.json and landscape.png, e.g. "
               f"{PROG} runs/at/last.pt --out runs/landscape")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser. ``--out`` is required, but checked after parsing (:func:`_require_out`), so that
    leaving it out is one line naming the fix rather than argparse's usage dump."""
    p = ArgumentParser(
        prog=PROG, allow_abbrev=False,
        usage=f"{PROG} CKPT [CKPT ...] --out DIR [options]",
        description="The weight loss landscape of awpfast-train checkpoints (the AWP paper's Figure 1):\n"
                    "adversarial loss along filter-normalized random directions, PGD regenerated at each point.\n"
                    "The data set, model and threat model come from the checkpoints (which must agree).",
        formatter_class=HelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="awpfast-train checkpoints (last.pt, best.pt)")
    p.add_argument("--labels", nargs="+", default=None, help="legend names, one per checkpoint")
    p.add_argument("--alphas", default="-1:1:21", help="START:STOP:POINTS or a comma list")
    p.add_argument("--directions", type=int, default=3, help="random directions (seeds SEED, SEED+1, ...)")
    p.add_argument("--samples", type=int, default=1000, help="first N images of the split (0: all)")
    p.add_argument("--split", choices=("test", "train"), default="test",
                   help="train: the checkpoint's own training images (its --train-samples, with its "
                        "--label-noise labels)")
    p.add_argument("--attack-steps", type=int, default=10, help="PGD steps (0: the clean loss)")
    p.add_argument("--eps", default=None, help="attack radius (default: the checkpoints'); '8/255' works")
    p.add_argument("--attack-step", default=None, help="PGD step size (default: eps/4)")
    p.add_argument("--norm", choices=("Linf", "L2"), default=None, help="threat model (default: the checkpoints')")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="override the checkpoints' --data-dir (CIFAR-10)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--seed", type=int, default=0, help="directions and PGD random starts")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default=None, help="awpfast seam backend for the weight moves")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", metavar="DIR", help="output folder (landscape.json, landscape.png); required")
    p.add_argument("--overwrite", action="store_true", help="replace existing landscape.json / landscape.png")
    p.add_argument("--no-plot", action="store_true", help="JSON only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _number(name: str, s) -> float:
    try:
        v = parse_float(s)
    except ValueError:
        raise UsageError(f"{name} {s!r} is not a number (e.g. 0.03 or 8/255)") from None
    if not (math.isfinite(v) and v >= 0):
        raise UsageError(f"{name} must be a finite number >= 0, got {s!r}")
    return v


def load_checkpoint(path: str) -> dict:
    """An awpfast-train checkpoint as a dict, or a one-line :class:`~awpfast.errors.UsageError` naming what is wrong
    (:func:`awpfast.checkpoint.read_checkpoint`, plus the entries the landscape needs)."""
    ck = read_checkpoint(path, "checkpoint")
    missing = [k for k in ("num_classes", "in_channels") if k not in ck]
    if missing:
        raise UsageError(f"{path}: incomplete awpfast-train checkpoint (missing {missing})")
    return ck


def _label(ck: dict, path: str) -> str:
    a = ck["args"]
    gamma = a.get("awp_gamma") or 0
    name = f"{str(a.get('method', '?')).upper()}{'-AWP' if gamma > 0 else ''}"
    if ck.get("epoch") is not None:
        name += f" (epoch {ck['epoch']})"
    return name


def _require_out(args) -> None:
    """A missing ``--out``: one line naming the fix (:class:`~awpfast.errors.UsageError`)."""
    if getattr(args, "out", None) is None:
        raise UsageError(_OUT_MISSING)


def _check_args(args) -> List[float]:
    _require_out(args)
    alphas = parse_alphas(args.alphas)
    if args.directions < 1:
        raise UsageError(f"--directions must be >= 1, got {args.directions}")
    if args.samples < 0:
        raise UsageError(f"--samples must be >= 0 (0: all), got {args.samples}")
    if args.attack_steps < 0:
        raise UsageError(f"--attack-steps must be >= 0 (0: the clean loss), got {args.attack_steps}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.labels is not None and len(args.labels) != len(args.checkpoints):
        raise UsageError(f"--labels has {len(args.labels)} names for {len(args.checkpoints)} checkpoints")
    return alphas


def _outputs(args) -> dict:
    paths = {"json": os.path.join(args.out, "landscape.json")}
    if not args.no_plot:
        paths["png"] = os.path.join(args.out, "landscape.png")
    check_out_dir(args.out, "--out")
    taken = [p for p in paths.values() if os.path.exists(p)]
    if taken and not args.overwrite:
        raise UsageError(f"{taken[0]} already exists; pass --overwrite to replace it or choose another --out")
    return paths


def _setting(cks, key, given, default=None, fixed: Optional[str] = None):
    """One value of a run option shared by all checkpoints (or the one given on the command line).
    ``fixed``: what the option is, when this command has no ``--KEY`` to settle a disagreement with."""
    if given is not None:
        return given
    vals = {repr(c["args"].get(key, default)) for c in cks}
    if len(vals) > 1:
        flag = "--" + key.replace("_", "-")
        if fixed is not None:
            raise UsageError(f"the checkpoints were trained on different {fixed}s ({', '.join(sorted(vals))}); "
                           f"compare checkpoints of one {fixed}")
        raise UsageError(f"the checkpoints disagree on {flag} ({', '.join(sorted(vals))}); "
                       f"pass {flag} to compare them at one value")
    return cks[0]["args"].get(key, default)


def run(args) -> dict:
    """Compute the landscapes for parsed ``args`` (see :func:`build_parser`), write the outputs."""
    from ..attacks import PGD
    from ..data import load_dataset, training_splits
    from ..models import build_model

    alphas = _check_args(args)
    paths = _outputs(args)
    device = resolve_device(args.device)
    cks = [load_checkpoint(p) for p in args.checkpoints]
    data = _setting(cks, "data", None, "digits", fixed="data set")  # awpfast-train's --data: not an option here
    image_size = {c.get("image_size", c["args"].get("image_size")) for c in cks}
    if len(image_size) > 1:
        raise UsageError(f"the checkpoints use different image sizes ({sorted(map(str, image_size))}); "
                       "compare checkpoints of one dataset")
    image_size = image_size.pop()
    norm = _setting(cks, "norm", args.norm, "Linf")
    eps = _number("--eps", args.eps) if args.eps is not None else \
        float(_setting(cks, "eps", None, 8 / 255 if norm == "Linf" else 0.5))
    step = _number("--attack-step", args.attack_step) if args.attack_step is not None else eps / 4
    data_dir = args.data_dir if args.data_dir is not None else _setting(cks, "data_dir", None)
    try:
        ds = load_dataset(data, data_dir, image_size)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        raise UsageError(str(e)) from None

    labels = list(args.labels) if args.labels else [_label(c, p) for c, p in zip(cks, args.checkpoints)]
    if len(set(labels)) < len(labels):  # make the legend unambiguous: the run folder, else the path
        runs = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.checkpoints]
        tags = runs if len(set(runs)) == len(runs) else list(args.checkpoints)
        labels = [f"{lab} [{t}]" for lab, t in zip(labels, tags)]

    bar = None
    total = len(cks) * args.directions * len(alphas)
    if not args.no_progress and sys.stderr.isatty():  # no progress bars in logs and pipes
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, desc="landscape", unit="pt", dynamic_ncols=True, leave=False)
        except ImportError:  # pragma: no cover - tqdm is a declared extra
            bar = None

    t0 = time.perf_counter()
    results = []
    try:
        for ck, path, label in zip(cks, args.checkpoints, labels):
            a = ck["args"]
            try:
                model = build_model(a["model"], ck["num_classes"] or ds.num_classes, ck["in_channels"], a.get("width"),
                                    a.get("input_norm", "none"))
                model.load_state_dict(ck["model"])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                msg = str(e).strip().splitlines()[0][:200]
                raise UsageError(f"{path}: the weights do not fit a {a['model']} model ({msg})") from None
            model.to(device).eval()
            if args.split == "test":
                split = ds.test
            else:  # the images this run trained on (its validation hold-out excluded)
                try:
                    split = training_splits(ds, a.get("val_samples"), a.get("train_samples"),
                                            a.get("label_noise") or 0.0)[0]
                except ValueError as e:
                    raise UsageError(f"{path}: {e}") from None
            split = split.subset(args.samples or None)
            x, y = split.x, split.y
            attack = PGD(model, eps=eps, alpha=step, steps=args.attack_steps, norm=norm, random_start=True,
                         backend=args.backend) if args.attack_steps > 0 else None
            per_dir = []
            for k in range(args.directions):
                d = filter_normalized_direction(model, seed=args.seed + k)
                if bar is not None:
                    bar.set_description(f"{label} dir {k + 1}/{args.directions}")
                cb = (lambda *_: bar.update(1)) if bar is not None else None
                per_dir.append(weight_landscape(model, x, y, alphas, direction=d, attack=attack, seed=args.seed,
                                                batch_size=args.batch_size, backend=args.backend, callback=cb))
            losses = [r["loss"] for r in per_dir]
            accs = [r["acc"] for r in per_dir]
            mean_loss = [sum(c) / len(c) for c in zip(*losses)]
            mean_acc = [sum(c) / len(c) for c in zip(*accs)]
            i0 = alphas.index(0.0) if 0.0 in alphas else None
            rise = None if i0 is None else \
                [sum(row[j] - row[i0] for row in losses) / len(losses) for j in range(len(alphas))]
            results.append({"path": path, "label": label, "epoch": ck.get("epoch"), "method": a.get("method"),
                            "awp_gamma": a.get("awp_gamma"), "model": a.get("model"), "n": int(len(y)),
                            "loss": losses, "acc": accs, "mean_loss": mean_loss, "mean_acc": mean_acc,
                            "flatness": rise})
    finally:
        if bar is not None:
            bar.close()
    doc = {"format": LANDSCAPE_FORMAT, "alphas": alphas, "directions": args.directions, "seed": args.seed,
           "split": args.split, "samples": results[0]["n"] if results else 0, "data": data,
           "attack": None if args.attack_steps == 0 else {"name": "PGD", "norm": norm, "eps": eps, "step": step,
                                                           "steps": args.attack_steps},
           "direction": "filter-normalized Gaussian (Li et al. 2018), biases and BatchNorm 0",
           "flatness_definition": "mean over directions of loss(alpha) - loss(0)",
           "checkpoints": results, "time_s": time.perf_counter() - t0}
    os.makedirs(args.out, exist_ok=True)
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, paths["json"])
    if "png" in paths:
        if plot_landscape(doc, paths["png"]) is None:
            paths.pop("png")
    doc["written"] = paths
    return doc


def plot_landscape(doc: dict, path: str) -> Optional[str]:
    """The checkpoints' landscapes overlaid (loss and accuracy against alpha) to a PNG;
    the shaded band spans the directions' min..max. Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no landscape.png (pip install matplotlib)")
        return None
    al = doc["alphas"]
    what = "clean" if doc["attack"] is None else f"PGD-{doc['attack']['steps']}"
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(doc["checkpoints"]):
        c = f"C{i % 10}"
        ax.plot(al, r["mean_loss"], "-", color=c, label=r["label"])
        if len(r["loss"]) > 1:
            ax.fill_between(al, [min(v) for v in zip(*r["loss"])], [max(v) for v in zip(*r["loss"])],
                            color=c, alpha=0.15, lw=0)
        ax2.plot(al, [100 * v for v in r["mean_acc"]], "-", color=c, label=r["label"])
    ax.set_xlabel(r"$\alpha$ (filter-normalized direction)"), ax.set_ylabel(f"{what} loss")
    ax.set_title(f"weight loss landscape ({doc['split']}, n={doc['samples']}, {doc['directions']} dir.)")
    ax2.set_xlabel(r"$\alpha$"), ax2.set_ylabel(f"{what} accuracy (%)"), ax2.set_title("accuracy")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    """``python -m awpfast.landscape``: returns the exit status (2 on a user error, printed as one
    line; set ``AWPFAST_DEBUG=1`` for the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # "--alphas -1:1:21": argparse would take "-1:1:21" for an option; glue it to its flag
    for i in range(len(argv) - 1):
        if argv[i] == "--alphas" and argv[i + 1].startswith("-"):
            argv[i:i + 2] = [f"--alphas={argv[i + 1]}"]
            break

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's own error (two lines, already printed) or --help: the status, returned
        return e.code if isinstance(e.code, int) else 2

    def parse():
        _require_out(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        return args

    def body(args):
        doc = run(args)
        for r in doc["checkpoints"]:
            i0 = doc["alphas"].index(0.0) if 0.0 in doc["alphas"] else None
            line = f"{r['label']}: loss {min(r['mean_loss']):.4f}..{max(r['mean_loss']):.4f}"
            if i0 is not None:
                line += f", at alpha=0 {r['mean_loss'][i0]:.4f} (acc {100 * r['mean_acc'][i0]:.2f} %)"
            print(line)
        print("wrote " + ", ".join(doc["written"].values()))
        return 0

    return cli_main("awpfast.landscape", parse, body, usage=USAGE_ERRORS + (ValueError, OSError))

