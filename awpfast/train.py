"""Adversarial training with AWP: ``python -m awpfast.train`` / ``awpfast-train``.

Runs offline out of the box (scikit-learn's digits, a small CNN)::

    awpfast-train --method at --awp-gamma 0.01 --epochs 30 --out runs/at-awp
    awpfast-train --method trades --model preact18 --data cifar10 --data-dir ~/data --amp bf16 --channels-last

Each epoch: one pass of adversarial training (attack, AWP ascent, descent at ``w + v``, restore),
then clean and PGD-20 accuracy on the test split and on a fixed subset of the training split.
Writes to ``--out``: ``metrics.jsonl`` (one JSON object per epoch), ``metrics.png`` (train/test
clean and robust accuracy per epoch), ``last.pt`` and ``best.pt`` (best test PGD-20 accuracy).
``--resume`` continues from ``last.pt`` exactly: model, optimizer with AWP state, LR schedule,
grad scaler, the loader's generator and the torch / CUDA / numpy / python RNG states.

The training step is the reference recipe (Wu et al. 2020) without its proxy model::

    x_adv = attack(x, y)                                   # eval-mode PGD, input gradients only
    model.train()
    with awp.perturbed(lambda: loss_fn(model, x, x_adv, y)):   # w <- w + v (BN stats frozen)
        loss = loss_fn(model, x, x_adv, y); loss.backward()
        awp.step()                                         # SGD step at w + v, then w -= v
    scheduler.step()                                       # piecewise LR, per iteration
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import AWP
from .attacks import PGD, TRADESAttack
from .data import Batches, DATASETS, load_dataset
from .losses import METHODS, get_loss

__all__ = ["build_parser", "main", "run", "evaluate_split", "build_model", "lr_factor", "plot_metrics",
           "parse_float"]

MODELS = ("preact18", "wrn34-10", "wrn28-10", "small-cnn")
DEFAULT_GAMMA = {"at": 0.01, "mart": 0.01, "trades": 0.005}
DEFAULT_WARMUP = {"at": 0, "mart": 0, "trades": 10}
CKPT_FORMAT = "awpfast-train/1"
# options that define the run: taken from the checkpoint on --resume
_RUN_KEYS = ("method", "beta", "awp_gamma", "awp_warmup", "awp_steps", "model", "width", "data", "data_dir",
             "image_size", "batch_size", "lr", "lr_schedule", "momentum", "weight_decay", "norm", "eps",
             "alpha", "attack_steps", "attack_bn", "eval_steps", "eval_samples", "train_eval_samples",
             "amp", "channels_last", "seed", "augment", "awp_restore", "train_samples")


def parse_float(s) -> float:
    """``"8/255"`` -> 0.0313...; ``"0.5"`` -> 0.5."""
    if isinstance(s, (int, float)):
        return float(s)
    s = str(s).strip()
    if "/" in s:
        a, b = s.split("/", 1)
        return float(a) / float(b)
    return float(s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="awpfast-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument_group("method")
    a.add_argument("--method", choices=METHODS, default="at", help="AT (Madry), TRADES or MART")
    a.add_argument("--beta", type=float, default=6.0, help="TRADES / MART trade-off")
    a.add_argument("--awp-gamma", type=float, default=None,
                   help="AWP relative size ||v||/||w||; 0 disables AWP (default 0.01 for at/mart, 0.005 for trades)")
    a.add_argument("--awp-warmup", type=int, default=None,
                   help="epochs without AWP at the start (default 0 for at/mart, 10 for trades)")
    a.add_argument("--awp-steps", type=int, default=1, help="AWP ascent steps")
    a.add_argument("--awp-restore", choices=("after_step", "before_step"), default="after_step")
    a.add_argument("--backend", default=None, help="awpfast seam backend (default: best available)")
    m = p.add_argument_group("model and data")
    m.add_argument("--model", choices=MODELS, default="small-cnn")
    m.add_argument("--width", type=int, default=None, help="small-cnn width (default 32)")
    m.add_argument("--data", choices=DATASETS, default="digits",
                   help="digits: scikit-learn's digits, embedded (no download); cifar10: needs --data-dir; "
                        "synthetic: random prototypes, for benchmarks")
    m.add_argument("--data-dir", default=None, help="folder with the CIFAR-10 python batches")
    m.add_argument("--image-size", type=int, default=None,
                   help="digits/synthetic input size (default: 16 for small-cnn, 32 otherwise)")
    m.add_argument("--train-samples", type=int, default=None,
                   help="train on the first N images of the training split only (quick runs)")
    m.add_argument("--augment", choices=("auto", "none", "crop", "crop+flip"), default="auto",
                   help="auto: crop+flip on CIFAR-10, none otherwise")
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=int, default=None, help="epochs (default 30; on --resume: the checkpoint's)")
    o.add_argument("--batch-size", type=int, default=128)
    o.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    o.add_argument("--lr-schedule", choices=("piecewise", "cosine", "constant"), default="piecewise",
                   help="piecewise: the reference's x0.1 at 50%% and x0.01 at 75%% of the epochs, per iteration")
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float, default=5e-4)
    o.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="autocast precision (default fp32)")
    o.add_argument("--channels-last", action="store_true")
    o.add_argument("--compile", action="store_true", help="torch.compile the model")
    k = p.add_argument_group("attack")
    k.add_argument("--norm", choices=("Linf", "L2"), default="Linf")
    k.add_argument("--eps", type=parse_float, default=None, help="radius (default 8/255 Linf, 0.5 L2); '8/255' works")
    k.add_argument("--alpha", type=parse_float, default=None, help="step (default eps/4)")
    k.add_argument("--attack-steps", type=int, default=10, help="PGD steps in training")
    k.add_argument("--attack-bn", choices=("eval", "train"), default="eval",
                   help="model mode during the training attack (train: the reference AT recipe)")
    k.add_argument("--eval-steps", type=int, default=20, help="PGD steps of the per-epoch evaluation")
    k.add_argument("--eval-samples", type=int, default=None, help="test images evaluated per epoch (default all)")
    k.add_argument("--train-eval-samples", type=int, default=500,
                   help="training images (a fixed subset) evaluated per epoch, for the generalization gap")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default=None, help="output folder (default runs/<method>[-awp]-<model>-<data>-s<seed>)")
    r.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from CKPT (default OUT/last.pt) exactly")
    r.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many epochs in this invocation (resume later with --resume)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    r.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    r.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    r.add_argument("--quiet", action="store_true", help="no per-epoch line either")
    return p


def resolve_defaults(args) -> argparse.Namespace:
    if args.epochs is None:
        args.epochs = 30
    if args.awp_gamma is None:
        args.awp_gamma = DEFAULT_GAMMA[args.method]
    if args.awp_warmup is None:
        args.awp_warmup = DEFAULT_WARMUP[args.method]
    if args.eps is None:
        args.eps = 8 / 255 if args.norm == "Linf" else 0.5
    if args.alpha is None:
        args.alpha = args.eps / 4
    if args.width is None and args.model == "small-cnn":
        args.width = 32
    if args.image_size is None and args.data != "cifar10":
        args.image_size = 16 if args.model == "small-cnn" else 32
    if args.out is None:
        tag = f"{args.method}{'-awp' if args.awp_gamma > 0 else ''}-{args.model}-{args.data}-s{args.seed}"
        args.out = os.path.join("runs", tag)
    return args


def lr_factor(schedule: str, t: float, epochs: int) -> float:
    """LR multiplier at (fractional) epoch ``t``."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(t, epochs) / epochs))
    if t / epochs < 0.5:
        return 1.0
    if t / epochs < 0.75:
        return 0.1
    return 0.01


def build_model(name: str, num_classes: int, in_channels: int = 3, width: Optional[int] = None):
    from .models import create_model
    kw = {"width": width} if (name == "small-cnn" and width) else {}
    return create_model(name, num_classes=num_classes, in_channels=in_channels, **kw)


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _autocast(device: torch.device, amp: Optional[str]):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def make_attack(model, args, steps: int, train: bool):
    cls = TRADESAttack if (train and args.method == "trades") else PGD
    return cls(model, eps=args.eps, alpha=args.alpha, steps=steps, random_start=True, norm=args.norm,
               bn_train=(train and args.attack_bn == "train"), backend=args.backend)


@torch.no_grad()
def _accuracy_counts(logits, y):
    return int((logits.argmax(1) == y).sum())


def evaluate_split(model, split, batch_size: int, eps: float, alpha: float, steps: int, norm: str = "Linf",
                   device="cpu", amp: Optional[str] = None, channels_last: bool = False, limit: Optional[int] = None,
                   backend: Optional[str] = None, random_start: bool = True) -> dict:
    """Clean and PGD-``steps`` accuracy (and mean CE) on a split, in eval mode."""
    device = torch.device(device)
    split = split.subset(limit)
    attack = PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, norm=norm, backend=backend)
    was = model.training
    model.eval()
    n = c_ok = r_ok = 0
    c_loss = r_loss = 0.0
    try:
        for x, y in Batches(split, batch_size, device=device):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp):
                with torch.no_grad():
                    lc = model(x).float()
                x_adv = attack(x, y) if steps > 0 else x
                with torch.no_grad():
                    lr_ = model(x_adv).float()
            n += len(y)
            c_ok += _accuracy_counts(lc, y)
            r_ok += _accuracy_counts(lr_, y)
            c_loss += float(F.cross_entropy(lc, y, reduction="sum"))
            r_loss += float(F.cross_entropy(lr_, y, reduction="sum"))
    finally:
        model.train(was)
    n = max(n, 1)
    return {"clean_acc": c_ok / n, "robust_acc": r_ok / n, "clean_loss": c_loss / n, "robust_loss": r_loss / n,
            "n": n}


def plot_metrics(history, path: str, title: str = "") -> Optional[str]:
    """Train/test clean and robust accuracy per epoch (and train loss) to a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    ep = [h["epoch"] for h in history]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, lab, st in (("train_clean_acc", "train clean", "C0--"), ("train_robust_acc", "train PGD", "C1--"),
                         ("test_clean_acc", "test clean", "C0-"), ("test_robust_acc", "test PGD", "C1-")):
        ax.plot(ep, [100 * h[key] for h in history], st, label=lab)
    if history:
        b = max(history, key=lambda h: h["test_robust_acc"])
        ax.axvline(b["epoch"], color="0.7", lw=0.8)
    ax.set_xlabel("epoch"), ax.set_ylabel("accuracy (%)"), ax.legend(), ax.grid(alpha=0.3)
    ax.set_title(title or "accuracy")
    ax2.plot(ep, [h["train_loss"] for h in history], "C2-", label="train loss")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("loss"), ax2.grid(alpha=0.3), ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _rng_state(loader: Batches) -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
          "loader": loader.generator.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict, loader: Batches) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    loader.generator.set_state(st["loader"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_metrics(path: str, history) -> None:
    with open(path + ".tmp", "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    os.replace(path + ".tmp", path)


def _load_resume(args, parser_defaults) -> dict:
    path = args.resume or os.path.join(args.out, "last.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not an awpfast-train checkpoint (format {ckpt.get('format')!r})")
    saved = ckpt["args"]
    for k in _RUN_KEYS:
        given = getattr(args, k, None)
        if given is not None and given != parser_defaults.get(k) and given != saved.get(k):
            warnings.warn(f"--resume: --{k.replace('_', '-')} {given!r} differs from the checkpoint's "
                          f"{saved.get(k)!r}; using the checkpoint's")
        setattr(args, k, saved.get(k))
    if args.epochs is None:
        args.epochs = saved["epochs"]
    return ckpt


def run(args) -> dict:
    """Train with parsed ``args`` (see :func:`build_parser`); returns the summary dict."""
    parser_defaults = vars(build_parser().parse_args([]))
    ckpt = None
    if args.resume is not None:
        if args.out is None and args.resume:
            args.out = os.path.dirname(os.path.abspath(args.resume))
        if args.out is None:
            raise ValueError("--resume without a path needs --out DIR (the run to continue)")
        ckpt = _load_resume(args, parser_defaults)
    resolve_defaults(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    device = _device(args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    ds = load_dataset(args.data, args.data_dir, args.image_size)
    augment = ds.augment if args.augment == "auto" else args.augment
    if args.train_samples is not None:
        ds.train = ds.train.subset(args.train_samples)
    model = build_model(args.model, ds.num_classes, ds.in_channels, args.width).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if args.compile else model
    base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    awp = AWP(base, model, gamma=args.awp_gamma, steps=args.awp_steps, restore=args.awp_restore,
              backend=args.backend)
    train_batches = Batches(ds.train, args.batch_size, shuffle=True, augment=augment, seed=args.seed,
                            drop_last=False, device=device)
    n_iter = len(train_batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        awp, lambda k: lr_factor(args.lr_schedule, (k + 1) / n_iter, args.epochs))
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    loss_fn = get_loss(args.method, args.beta)
    attack = make_attack(fwd, args, args.attack_steps, train=True)

    start, history, best = 0, [], {"epoch": None, "test_robust_acc": -1.0}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        awp.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"], train_batches)
        start, history, best = ckpt["epoch"], list(ckpt["history"]), dict(ckpt["best"])
        say(f"resumed from epoch {start} ({args.resume or os.path.join(args.out, 'last.pt')})")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    _write_metrics(metrics_path, history)
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1, sort_keys=True)

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    show_bar = not args.no_progress and not args.quiet and tqdm is not None
    say(f"awpfast-train: {args.method}{' + AWP(gamma=%g)' % args.awp_gamma if args.awp_gamma > 0 else ''} | "
        f"{args.model} on {args.data} ({len(ds.train)} train / {len(ds.test)} test, {ds.image_size}px) | "
        f"{args.norm} eps={args.eps:.4g} alpha={args.alpha:.4g} | {device} | out={args.out}")
    stop_at = args.epochs if args.stop_after is None else min(args.epochs, start + args.stop_after)
    for epoch in range(start, stop_at):
        awp.set_gamma(args.awp_gamma if epoch >= args.awp_warmup else 0.0)
        model.train()
        t0 = time.perf_counter()
        tot_loss, tot_ok, tot_n = 0.0, 0, 0
        it = train_batches
        bar = tqdm(it, total=n_iter, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True) \
            if show_bar else None
        for x, y in (bar if bar is not None else it):
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, args.amp):
                x_adv = attack(x, y)
            model.train()
            scale = scaler.get_scale() if scaler is not None else 1.0

            def closure():
                with _autocast(device, args.amp):
                    return loss_fn(fwd, x, x_adv, y) * scale

            with awp.perturbed(closure):
                awp.zero_grad(set_to_none=True)
                with _autocast(device, args.amp):
                    loss, logits_adv = loss_fn(fwd, x, x_adv, y, return_logits=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(awp)
                    scaler.update()
                else:
                    loss.backward()
                    awp.step()
            sched.step()
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch + 1}; lower --lr or drop --amp fp16")
            tot_loss += float(loss.detach()) * len(y)
            tot_ok += _accuracy_counts(logits_adv.detach(), y)
            tot_n += len(y)
            if bar is not None:
                el = time.perf_counter() - t0
                bar.set_postfix(loss=f"{tot_loss / tot_n:.4f}", acc=f"{100 * tot_ok / tot_n:.1f}%",
                                img_s=f"{tot_n / max(el, 1e-9):.0f}")
        if bar is not None:
            bar.close()
        train_time = time.perf_counter() - t0
        t1 = time.perf_counter()
        ev = dict(batch_size=max(args.batch_size, 128), eps=args.eps, alpha=args.alpha, steps=args.eval_steps,
                  norm=args.norm, device=device, amp=args.amp, channels_last=args.channels_last, backend=args.backend)
        te = evaluate_split(fwd, ds.test, limit=args.eval_samples, **ev)
        tr = evaluate_split(fwd, ds.train, limit=args.train_eval_samples, **ev)
        rec = {"epoch": epoch + 1, "lr": awp.param_groups[0]["lr"], "awp_gamma": awp.param_groups[0]["awp_gamma"],
               "train_loss": tot_loss / tot_n, "train_adv_acc": tot_ok / tot_n,
               "train_clean_acc": tr["clean_acc"], "train_robust_acc": tr["robust_acc"],
               "test_clean_acc": te["clean_acc"], "test_robust_acc": te["robust_acc"],
               "test_clean_loss": te["clean_loss"], "test_robust_loss": te["robust_loss"],
               "train_time_s": train_time, "eval_time_s": time.perf_counter() - t1,
               "img_per_s": tot_n / max(train_time, 1e-9)}
        history.append(rec)
        is_best = rec["test_robust_acc"] > best["test_robust_acc"]
        if is_best:
            best = {"epoch": epoch + 1, "test_robust_acc": rec["test_robust_acc"],
                    "test_clean_acc": rec["test_clean_acc"]}
        state = {"format": CKPT_FORMAT, "epoch": epoch + 1, "model": model.state_dict(),
                 "optimizer": awp.state_dict(), "scheduler": sched.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "rng": _rng_state(train_batches), "history": history, "best": best, "args": vars(args),
                 "num_classes": ds.num_classes, "in_channels": ds.in_channels, "image_size": ds.image_size}
        _atomic_save(state, os.path.join(args.out, "last.pt"))
        if is_best:
            _atomic_save(state, os.path.join(args.out, "best.pt"))
        _write_metrics(metrics_path, history)
        if not args.no_plot:
            plot_metrics(history, os.path.join(args.out, "metrics.png"),
                         title=f"{args.method}{'-AWP' if args.awp_gamma > 0 else ''} {args.model} {args.data} seed {args.seed}")
        say(f"epoch {epoch + 1:3d}/{args.epochs} lr {rec['lr']:.4g} loss {rec['train_loss']:.4f} | "
            f"train clean {100 * tr['clean_acc']:.2f} PGD-{args.eval_steps} {100 * tr['robust_acc']:.2f} | "
            f"test clean {100 * te['clean_acc']:.2f} PGD-{args.eval_steps} {100 * te['robust_acc']:.2f} | "
            f"{rec['img_per_s']:.0f} img/s, {train_time:.1f}s + eval {rec['eval_time_s']:.1f}s"
            + ("  *best" if is_best else ""))
    summary = {"out": args.out, "epochs_done": len(history), "best": best,
               "last": history[-1] if history else None}
    if history:
        last = history[-1]
        say(f"done: best epoch {best['epoch']} test PGD-{args.eval_steps} {100 * best['test_robust_acc']:.2f}% | "
            f"last test clean {100 * last['test_clean_acc']:.2f}% PGD-{args.eval_steps} "
            f"{100 * last['test_robust_acc']:.2f}% | {args.out}")
    return summary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"awpfast-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
