"""Adversarial training with AWP: ``python -m awpfast.train`` / ``awpfast-train``.

Runs offline out of the box (scikit-learn's digits, a small CNN)::

    awpfast-train --method at --awp-gamma 0.01 --epochs 30 --out runs/at-awp
    awpfast-train --method trades --model preact18 --data cifar10 --data-dir ~/data --amp bf16 --channels-last
    torchrun --nproc_per_node 4 -m awpfast.train --model wrn34-10 --data cifar10 --data-dir ~/data

Each epoch: one pass of adversarial training (attack, AWP ascent, descent at ``w + v``, restore),
then clean and PGD-20 accuracy on a held-out validation split (``--val-samples`` training images,
never trained on), on the test split and on a fixed subset of the training split.
Writes to ``--out``: ``metrics.jsonl`` (one JSON object per epoch), ``metrics.png`` (train/test
clean and robust accuracy per epoch), ``last.pt`` and ``best.pt`` (best validation PGD-20
accuracy; best test PGD-20 with ``--val-samples 0``). A folder that already holds a run is
never overwritten: ``--resume`` continues it exactly (model, optimizer with AWP state, LR schedule,
grad scaler, the loader's generator and the torch / CUDA / numpy / python RNG states),
``--overwrite`` replaces it.

Every option is validated before anything is written; errors are one line (set
``AWPFAST_DEBUG=1`` for the traceback).

The training step is the reference recipe (Wu et al. 2020) without its proxy model::

    x_adv = attack(x, y)                                   # eval-mode PGD, input gradients only
    model.train()
    with awp.perturbed(lambda: loss_fn(model, x, x_adv, y)):   # w <- w + v (BN stats frozen)
        loss = loss_fn(model, x, x_adv, y); loss.backward()
        awp.step()                                         # SGD step at w + v, then w -= v
    scheduler.step()                                       # piecewise LR, per iteration

``--recipe at-awp-reference`` / ``trades-awp-reference`` (and ``at-reference`` / ``trades-reference``)
set the options of the reference scripts instead of ours, including the train-mode AT attack and the
order in which their forwards feed BatchNorm (``--forward-order reference``); docs/recipes.md lists
both side by side. ``--track-flatness`` logs the flatness of the adversarial weight loss landscape
each epoch (:func:`flatness_epoch`) without changing the trajectory; ``--label-noise P`` flips a
fixed fraction of the training labels.

Under ``torchrun --nproc_per_node N``, ``--batch-size`` is the global batch: each process trains
on ``batch_size / N`` examples per step (the split must be even), the model is wrapped in
``DistributedDataParallel`` (or ``fully_shard`` with ``--fsdp``) and passed wrapped to
``awpfast.AWP``; only rank 0 prints, plots and writes.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import AWP
from .attacks import L2_ORDERS, PGD, TRADESAttack
from .data import CIFAR10_MEAN, CIFAR10_STD, DATASETS, PAD_MODES, Batches, Split, load_dataset, split_validation
from .losses import FORWARD_ORDERS, METHODS, get_loss
from .models import MODEL_NAMES

__all__ = ["build_parser", "main", "run", "make_config", "RunConfig", "UsageError", "evaluate_split",
           "training_splits", "build_model", "lr_factor", "plot_metrics", "parse_float", "read_checkpoint",
           "resolve_device", "RECIPES", "apply_recipe", "symmetric_label_noise", "train_epoch", "setup",
           "flatness_epoch", "eps_ramp"]

MODELS = MODEL_NAMES
DEFAULT_GAMMA = {"at": 0.01, "mart": 0.01, "trades": 0.005}
DEFAULT_WARMUP = {"at": 0, "mart": 0, "trades": 10}
DEFAULT_VAL = {"cifar10": 1000, "digits": 100, "synthetic": 100}
INPUT_NORMS = {"none": (None, None), "cifar10": (CIFAR10_MEAN, CIFAR10_STD)}
LR_SCHEDULES = ("piecewise", "piecewise-epoch", "cosine", "constant")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
LABEL_NOISE_SEED = 20200303   # fixed: the noisy labels never depend on --seed
FLATNESS_SEED = 0             # the directions and PGD starts of --track-flatness (the same every epoch)
CKPT_FORMAT = "awpfast-train/1"
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "metrics.png", "args.json")
# options that define the run: taken from the checkpoint on --resume
_RUN_KEYS = ("method", "beta", "awp_gamma", "awp_warmup", "awp_steps", "model", "width", "data", "data_dir",
             "image_size", "batch_size", "lr", "lr_schedule", "momentum", "weight_decay", "norm", "eps",
             "alpha", "attack_steps", "attack_bn", "eval_steps", "eval_samples", "train_eval_samples",
             "amp", "channels_last", "seed", "augment", "awp_restore", "train_samples", "val_samples",
             "input_norm", "pad_mode", "recipe", "forward_order", "trades_l2_order", "label_noise", "dtype",
             "track_flatness", "flatness_alpha", "flatness_directions", "flatness_samples", "flatness_steps",
             "eps_warmup", "eval_every")
# what checkpoints written before an option existed did (they stay loadable and resume as they ran)
_OLD_RUN_DEFAULTS = {"val_samples": 0, "input_norm": "none", "pad_mode": "zeros", "recipe": None,
                     "forward_order": "ours", "trades_l2_order": "renorm-clamp", "label_noise": 0.0,
                     "dtype": "float32", "track_flatness": False, "flatness_alpha": 0.5, "flatness_directions": 3,
                     "flatness_samples": 200, "flatness_steps": 10, "eps_warmup": 0, "eval_every": 1}
# options a programmatic Namespace may lack (older callers), with the parser's defaults
_NEW_OPTION_DEFAULTS = {"overwrite": False, "ddp": False, "fsdp": False, "val_samples": None, "input_norm": "auto",
                        "pad_mode": "auto", "recipe": None, "forward_order": "ours", "trades_l2_order": "renorm-clamp",
                        "label_noise": 0.0, "dtype": "float32", "track_flatness": False, "flatness_alpha": 0.5,
                        "flatness_directions": 3, "flatness_samples": 200, "flatness_steps": 10, "eps_warmup": 0,
                        "eval_every": 1}
_DEBUG_ENV = "AWPFAST_DEBUG"


# ----------------------------------------------------------------------------- recipes
def _at_eps(a):
    return 8 / 255 if a.norm == "Linf" else 128 / 255


def _at_alpha(a):
    return 2 / 255 if a.norm == "Linf" else 15 / 255


def _trades_alpha(a):
    # L2: the TRADES reference steps with SGD on delta at lr = 2 * eps / steps (its --step-size is L-inf only)
    return 2 / 255 if a.norm == "Linf" else 2 * a.eps / max(a.attack_steps, 1)


_AT_REFERENCE = {  # csdongxian/AWP AT_AWP/train_cifar10.py, built on Rice et al.'s train_cifar.py
    "method": "at", "awp_gamma": 0.01, "awp_warmup": 0, "awp_steps": 1, "awp_restore": "after_step",
    "model": "preact18", "data": "cifar10", "augment": "crop+flip", "pad_mode": "reflect", "input_norm": "cifar10",
    "epochs": 200, "batch_size": 128, "lr": 0.1, "lr_schedule": "piecewise", "momentum": 0.9,
    "weight_decay": 5e-4, "attack_steps": 10, "attack_bn": "train", "eval_steps": 20, "forward_order": "reference",
    "eps": _at_eps, "alpha": _at_alpha,
}
_TRADES_REFERENCE = {  # csdongxian/AWP TRADES_AWP/train_trades_cifar10.py, built on Zhang et al.'s TRADES
    "method": "trades", "beta": 6.0, "awp_gamma": 0.005, "awp_warmup": 9, "awp_steps": 1,
    "awp_restore": "after_step", "model": "wrn34-10", "data": "cifar10", "augment": "crop+flip", "pad_mode": "zeros",
    "input_norm": "none", "epochs": 200, "batch_size": 128, "lr": 0.1, "lr_schedule": "piecewise-epoch",
    "momentum": 0.9, "weight_decay": 5e-4, "attack_steps": 10, "attack_bn": "eval", "eval_steps": 20,
    "forward_order": "reference", "trades_l2_order": "clamp-renorm", "eps": _at_eps, "alpha": _trades_alpha,
}
RECIPES = {
    "at-awp-reference": _AT_REFERENCE,
    "at-reference": dict(_AT_REFERENCE, awp_gamma=0.0),
    "trades-awp-reference": _TRADES_REFERENCE,
    "trades-reference": dict(_TRADES_REFERENCE, awp_gamma=0.0),
}
"""``--recipe NAME``: the option values that reproduce a reference script (see docs/recipes.md).
Values may be callables of the partly resolved options (eps and alpha depend on ``--norm``)."""


def recipe_overrides(args) -> dict:
    """``{option: [value, the recipe's value]}`` for the options of ``args`` that differ from its ``--recipe``."""
    if not getattr(args, "recipe", None) or args.recipe not in RECIPES:
        return {}
    probe = argparse.Namespace(**vars(args))
    out = {}
    for key, val in RECIPES[args.recipe].items():
        want = val(probe) if callable(val) else val
        have = getattr(args, key, None)
        same = have == want or (isinstance(want, float) and isinstance(have, (int, float))
                                and math.isclose(have, want, rel_tol=1e-12, abs_tol=0.0))
        if not same:
            out[key] = [have, want]
    return out


def apply_recipe(args, explicit: set) -> List[str]:
    """Set the options of ``RECIPES[args.recipe]`` that were not given explicitly (in place).
    Returns the options it set; raises :class:`UsageError` when ``--method`` contradicts the recipe."""
    name = getattr(args, "recipe", None)
    if not name:
        return []
    if name not in RECIPES:
        raise UsageError(f"--recipe {name!r} is unknown: choose one of {', '.join(RECIPES)}")
    values = RECIPES[name]
    if "method" in explicit and args.method != values["method"]:
        other = [n for n, v in RECIPES.items() if v["method"] == args.method]
        hint = f"use --recipe {other[0]}" if other else "drop --recipe"
        raise UsageError(f"--recipe {name} is a {values['method']} recipe but --method is {args.method}: drop "
                         f"--method or {hint}")
    done = []
    for key, val in sorted(values.items(), key=lambda kv: callable(kv[1])):  # plain values first, then eps, alpha
        if key in explicit:
            continue
        setattr(args, key, val(args) if callable(val) else val)
        done.append(key)
    return done


class UsageError(ValueError):
    """A problem with the command line or its files, reported as one line (no traceback)."""


class NumberError(argparse.ArgumentTypeError, ValueError):
    """A command-line value that is not a number: argparse prints its message as a one-line error;
    callers outside argparse can catch it as a ``ValueError``."""


def parse_float(s) -> float:
    """``"8/255"`` -> 0.0313...; ``"0.5"`` -> 0.5. Raises :class:`NumberError` (an
    ``argparse.ArgumentTypeError`` and a ``ValueError``) on anything else."""
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s)
    text = str(s).strip()
    try:
        if "/" in text:
            a, b = text.split("/", 1)
            return float(a) / float(b)
        return float(text)
    except ZeroDivisionError:
        raise NumberError(f"{text!r} divides by zero") from None
    except ValueError:
        raise NumberError(f"{text!r} is not a number (e.g. 0.03 or 8/255)") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a two-line error (the problem, then where to look) instead of the full usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default exactly once: appended as ``(default: X)`` unless the help
    text already states the default itself (options whose default depends on others)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text.lower() or action.default is argparse.SUPPRESS
                or action.nargs == 0 or action.default is None):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The ``awpfast-train`` argument parser."""
    p = ArgumentParser(prog="awpfast-train", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    a = p.add_argument_group("method")
    a.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                   help="preset: the options of a reference script (the AT-AWP / TRADES-AWP code of Wu et al., "
                        "or its AT / TRADES without AWP); options given explicitly override it, args.json records "
                        "the resolved values (see docs/recipes.md) (default: none, i.e. our own settings)")
    a.add_argument("--method", choices=METHODS, default="at", help="AT (Madry), TRADES or MART")
    a.add_argument("--beta", type=float, default=6.0, help="TRADES / MART trade-off")
    a.add_argument("--awp-gamma", type=float, default=None,
                   help="AWP relative size ||v||/||w||; 0 disables AWP (default: 0.01 for at/mart, 0.005 for trades)")
    a.add_argument("--awp-warmup", type=int, default=None,
                   help="epochs without AWP at the start (default: 0 for at/mart, 10 for trades)")
    a.add_argument("--awp-steps", type=int, default=1, help="AWP ascent steps")
    a.add_argument("--awp-restore", choices=("after_step", "before_step"), default="after_step",
                   help="after_step: step at w+v then subtract v (the reference); before_step: restore w exactly, "
                        "then step")
    a.add_argument("--forward-order", choices=FORWARD_ORDERS, default="ours",
                   help="how BatchNorm's running statistics are fed; reference: as the reference scripts: AT: the "
                        "train-mode attack's extra loss forward on x_adv and a clean train-mode forward after the "
                        "restore; TRADES: at w+v the forwards adversarial, clean, clean (ours: clean, adversarial)")
    a.add_argument("--backend", default=None,
                   help="awpfast seam backend: reference, foreach, triton or native (default: $AWPFAST_BACKEND, "
                        "else the best available)")
    m = p.add_argument_group("model and data")
    m.add_argument("--model", choices=MODELS, default="small-cnn", help="architecture")
    m.add_argument("--width", type=int, default=None, help="small-cnn width (default: 32)")
    m.add_argument("--data", choices=DATASETS, default="digits",
                   help="digits: scikit-learn's digits, embedded (no download); cifar10: needs --data-dir; "
                        "synthetic: random prototypes, for benchmarks")
    m.add_argument("--data-dir", default=None, help="folder with the CIFAR-10 python batches (default: none)")
    m.add_argument("--image-size", type=int, default=None,
                   help="digits/synthetic input size (default: 16 for small-cnn, 32 otherwise; cifar10 is 32)")
    m.add_argument("--train-samples", type=int, default=None,
                   help="train on the first N images of the training split only, for quick runs (default: all)")
    m.add_argument("--val-samples", type=int, default=None,
                   help="training images held out (a fixed subset) to select best.pt; 0 selects on the test split "
                        "(default: 1000 on cifar10, 100 on digits and synthetic)")
    m.add_argument("--augment", choices=("auto", "none", "crop", "crop+flip"), default="auto",
                   help="auto: crop+flip on CIFAR-10, none otherwise")
    m.add_argument("--pad-mode", choices=("auto",) + PAD_MODES, default="auto",
                   help="crop padding; auto: reflect for at (the AT reference), zeros for trades/mart "
                        "(torchvision's RandomCrop, their references)")
    m.add_argument("--input-norm", choices=("auto",) + tuple(INPUT_NORMS), default="auto",
                   help="per-channel normalization inside the model (inputs stay in [0, 1]); auto: the CIFAR-10 "
                        "mean/std for at on cifar10 (the AT reference), none otherwise")
    m.add_argument("--label-noise", type=parse_float, default=0.0, metavar="P",
                   help="symmetric label noise: a fixed fraction P of the training images (not the validation or "
                        "test images) gets a label drawn uniformly from the other classes, once, seeded "
                        "independently of --seed (the same noisy labels in every epoch, seed and arm)")
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=int, default=None, help="epochs (default: 30; on --resume: the checkpoint's)")
    o.add_argument("--batch-size", type=int, default=128,
                   help="global batch size; under torchrun it is split evenly over the processes")
    o.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    o.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="piecewise",
                   help="piecewise: x0.1 at 50%% and x0.01 at 75%% of the epochs, per iteration (the AT reference); "
                        "piecewise-epoch: the same per epoch, x0.1 from 1-based epoch E/2 and x0.01 from 3E/4 "
                        "(the TRADES reference: epochs 100 and 150 of 200)")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    o.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    o.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="autocast precision (default: fp32)")
    o.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="parameter and input dtype; float64 is for exactness checks against a float64 reference "
                        "(slow; not with --amp)")
    o.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    o.add_argument("--compile", action="store_true",
                   help="torch.compile the model (compiling costs tens of seconds up front: measured 46 s against "
                        "4 s for a 1-epoch digits run on CPU, so it can only pay off on long runs)")
    k = p.add_argument_group("attack")
    k.add_argument("--norm", choices=("Linf", "L2"), default="Linf", help="threat model")
    k.add_argument("--eps", type=parse_float, default=None,
                   help="radius (default: 8/255 Linf, 0.5 L2); '8/255' works")
    k.add_argument("--alpha", type=parse_float, default=None, help="PGD step (default: eps/4)")
    k.add_argument("--attack-steps", type=int, default=10, help="PGD steps in training")
    k.add_argument("--eps-warmup", type=int, default=0, metavar="N",
                   help="ramp the training attack's eps (and its step, in proportion) linearly from 0 to --eps over "
                        "the first N epochs, per iteration (eps * min(1, t / N), t = epoch + (i + 1) / iterations, "
                        "the LR schedule's clock); evaluation always uses the full --eps; 0: no ramp")
    k.add_argument("--attack-bn", choices=("eval", "train"), default="eval",
                   help="model mode during the training attack (train: the reference AT recipe)")
    k.add_argument("--trades-l2-order", choices=L2_ORDERS, default="renorm-clamp",
                   help="L2 TRADES attack: renorm-clamp projects onto the eps-ball, then clamps to [0, 1] (as PGD); "
                        "clamp-renorm clamps, then projects (the TRADES reference)")
    k.add_argument("--eval-steps", type=int, default=20, help="PGD steps of the per-epoch evaluation")
    k.add_argument("--eval-samples", type=int, default=None, help="test images evaluated per epoch (default: all)")
    k.add_argument("--train-eval-samples", type=int, default=500,
                   help="training images (a fixed subset) evaluated per epoch, for the generalization gap; 0 skips")
    k.add_argument("--eval-every", type=int, default=1, metavar="K",
                   help="evaluate the test split and the training subset (and --track-flatness) only every K epochs, "
                        "at the last epoch and at every epoch whose validation PGD accuracy is a new best (so best.pt "
                        "always has its test numbers); the validation split is evaluated every epoch; other epochs "
                        "log null. Without a validation split (--val-samples 0) best.pt is chosen among the "
                        "evaluated epochs")
    f = p.add_argument_group("flatness")
    f.add_argument("--track-flatness", action="store_true",
                   help="log the flatness of the adversarial weight loss landscape each epoch (metrics.jsonl "
                        "'flatness', plotted against the robust generalization gap): the mean over fixed "
                        "filter-normalized directions d of L(w + alpha d) - L(w), L the PGD cross-entropy on a "
                        "fixed training subset, eval mode, PGD regenerated at each point; the training trajectory "
                        "is unchanged")
    f.add_argument("--flatness-alpha", type=parse_float, default=0.5,
                   help="step along each direction, in filter norms")
    f.add_argument("--flatness-directions", type=int, default=3, help="random directions (the same every epoch)")
    f.add_argument("--flatness-samples", type=int, default=200,
                   help="training images (the first N of the training split, the same every epoch)")
    f.add_argument("--flatness-steps", type=int, default=10,
                   help="PGD steps of the flatness attack (--eps, --alpha and --norm of the run; 0: clean loss)")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0, help="random seed")
    r.add_argument("--out", default=None,
                   help="output folder (default: runs/<method>[-awp]-<model>-<data>-s<seed>)")
    r.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from CKPT (default: OUT/last.pt) exactly")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, such a folder is refused)")
    r.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many epochs in this invocation, resume later with --resume (default: none)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    d = r.add_mutually_exclusive_group()
    d.add_argument("--ddp", action="store_true",
                   help="under torchrun: DistributedDataParallel (what a torchrun launch uses by default)")
    d.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 (fully_shard) instead of DDP")
    r.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none anyway when stderr is not a terminal)")
    r.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    r.add_argument("--quiet", action="store_true", help="no per-epoch line either")
    return p


def explicit_options(parser: argparse.ArgumentParser, argv) -> set:
    """The destinations of the options given on the command line ``argv`` (not defaults)."""
    probe = copy.deepcopy(parser)
    for act in probe._actions:
        act.default = argparse.SUPPRESS
        act.required = False
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        try:
            ns = probe.parse_args(argv)
        except SystemExit:  # pragma: no cover - the real parser already accepted argv
            return set()
    return set(vars(ns))


# ----------------------------------------------------------------------------- configuration
@dataclass
class DistInfo:
    """How this process was launched: one process, or one of ``world_size`` under torchrun."""
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    mode: Optional[str] = None  # None (one process), "ddp" or "fsdp"

    @property
    def enabled(self) -> bool:
        return self.mode is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class RunConfig:
    """Everything a run needs, validated: built by :func:`make_config` before any file is touched."""
    args: argparse.Namespace
    device: torch.device
    dist: DistInfo = field(default_factory=DistInfo)
    resume_path: Optional[str] = None
    checkpoint: Optional[dict] = None
    notes: List[str] = field(default_factory=list)


def resolve_defaults(args) -> argparse.Namespace:
    """Fill the options whose default depends on others (in place; returns ``args``)."""
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
    if getattr(args, "val_samples", None) is None:
        args.val_samples = DEFAULT_VAL.get(args.data, 0)
    if getattr(args, "input_norm", "auto") in (None, "auto"):
        args.input_norm = "cifar10" if (args.method == "at" and args.data == "cifar10") else "none"
    if getattr(args, "pad_mode", "auto") in (None, "auto"):
        args.pad_mode = "reflect" if args.method == "at" else "zeros"
    for key, val in _NEW_OPTION_DEFAULTS.items():
        if getattr(args, key, None) is None and val is not None:
            setattr(args, key, val)
    if args.out is None:
        tag = f"{args.method}{'-awp' if args.awp_gamma > 0 else ''}-{args.model}-{args.data}-s{args.seed}"
        args.out = os.path.join("runs", tag)
    return args


def _opt(key: str) -> str:
    return "--" + key.replace("_", "-")


def _need_int(args, key, lo, allow_none=False, what=None):
    v = getattr(args, key)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise UsageError(f"{_opt(key)} must be an integer >= {lo}{what or ''}, got {v!r}")


def _need_float(args, key, lo, strict=False, hi=None, what=""):
    v = getattr(args, key)
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UsageError(f"{_opt(key)} must be a number, got {v!r}") from None
    ok = math.isfinite(f) and (f > lo if strict else f >= lo) and (hi is None or f <= hi)
    if not ok:
        bound = f"> {lo}" if strict else f">= {lo}"
        raise UsageError(f"{_opt(key)} must be a finite number {bound}{f' and <= {hi}' if hi is not None else ''}"
                         f"{what}, got {v!r}")
    setattr(args, key, f)


def validate_args(args) -> None:
    """Check every option (after :func:`resolve_defaults`); raises :class:`UsageError`."""
    for key in ("epochs", "batch_size", "awp_steps", "eval_every"):
        _need_int(args, key, 1)
    for key in ("awp_warmup", "attack_steps", "eval_steps", "train_eval_samples", "val_samples", "eps_warmup"):
        _need_int(args, key, 0)
    for key in ("train_samples", "eval_samples", "stop_after", "threads", "width"):
        _need_int(args, key, 1, allow_none=True, what=" (or leave it out)")
    _need_int(args, "seed", 0)
    if args.seed >= 2 ** 32:
        raise UsageError(f"--seed must be < 2**32, got {args.seed}")
    if args.image_size is not None:
        if args.data == "cifar10" and args.image_size != 32:
            raise UsageError(f"CIFAR-10 images are 32x32: drop --image-size {args.image_size}")
        _need_int(args, "image_size", 4)
    _need_float(args, "lr", 0, strict=True)
    _need_float(args, "momentum", 0)
    _need_float(args, "weight_decay", 0)
    _need_float(args, "beta", 0)
    _need_float(args, "awp_gamma", 0, what=" (0 disables AWP)")
    _need_float(args, "eps", 0, hi=1.0 if args.norm == "Linf" else None, what=" (inputs live in [0, 1])")
    _need_float(args, "alpha", 0)
    if args.alpha == 0 and args.eps > 0 and args.attack_steps > 0:
        raise UsageError("--alpha 0 makes PGD a no-op: give a step > 0 (default eps/4)")
    if args.data == "cifar10" and not args.data_dir:
        raise UsageError("--data cifar10 needs --data-dir PATH: a folder holding the CIFAR-10 python batches "
                         "(cifar-10-python.tar.gz, extracted)")
    if args.model != "small-cnn" and args.width is not None:
        raise UsageError(f"--width applies to small-cnn only, not to {args.model}: drop it")
    _need_float(args, "label_noise", 0, hi=0.99, what=" (a fraction of the training labels)")
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.dtype != "float32" and args.amp:
        raise UsageError(f"--dtype {args.dtype} and --amp {args.amp} contradict each other: drop one of them")
    if args.lr_schedule not in LR_SCHEDULES:
        raise UsageError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {args.lr_schedule!r}")
    if args.forward_order not in FORWARD_ORDERS:
        raise UsageError(f"--forward-order must be one of {', '.join(FORWARD_ORDERS)}, got {args.forward_order!r}")
    if args.forward_order == "reference" and args.method not in ("at", "trades"):
        raise UsageError(f"--forward-order reference follows the AT and TRADES reference scripts; --method "
                         f"{args.method} has none: drop --forward-order")
    if args.trades_l2_order not in L2_ORDERS:
        raise UsageError(f"--trades-l2-order must be one of {', '.join(L2_ORDERS)}, got {args.trades_l2_order!r}")
    if args.track_flatness:
        _need_float(args, "flatness_alpha", -math.inf)
        if args.flatness_alpha == 0:
            raise UsageError("--flatness-alpha 0 makes the flatness 0 by definition: give a step such as 0.5")
        for key in ("flatness_directions", "flatness_samples"):
            _need_int(args, key, 1)
        _need_int(args, "flatness_steps", 0)
    if args.backend is not None:
        from .ops import BACKENDS
        if args.backend not in BACKENDS:
            raise UsageError(f"--backend {args.backend!r} is unknown: choose one of {', '.join(BACKENDS)}")


def resolve_device(spec: str, dist: Optional[DistInfo] = None) -> torch.device:
    """The device for ``--device spec``; a clear :class:`UsageError` when it is not there."""
    dist = dist or DistInfo()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no GPU visible"
            raise UsageError(f"--device {spec}: CUDA is not available here ({build}); use --device cpu "
                             "(or auto)")
        if dev.index is None:
            dev = torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"--device {spec}: MPS is not available here; use --device cpu (or auto)")
    elif dev.type != "cpu":
        raise UsageError(f"--device {spec}: unsupported device type {dev.type!r}; use cpu, cuda or mps")
    return dev


def _dist_from_env(args) -> DistInfo:
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        if getattr(args, "ddp", False) or getattr(args, "fsdp", False):
            flag = "--fsdp" if args.fsdp else "--ddp"
            raise UsageError(f"{flag} needs a launch by torchrun: torchrun --nproc_per_node N -m awpfast.train ...")
        return DistInfo()
    try:
        w, r, lr = int(world), int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UsageError("WORLD_SIZE / RANK / LOCAL_RANK are not integers: launch with torchrun") from None
    return DistInfo(world_size=w, rank=r, local_rank=lr, mode="fsdp" if getattr(args, "fsdp", False) else "ddp")


def read_checkpoint(path: str, what: str = "checkpoint", require_train: bool = True) -> dict:
    """Load a checkpoint file (on the CPU), turning every failure into one-line :class:`UsageError`.

    With ``require_train`` the file must be an ``awpfast-train`` checkpoint (``last.pt``/``best.pt``)."""
    if not os.path.exists(path):
        raise UsageError(f"{what}: no checkpoint at {path}")
    if os.path.isdir(path):
        raise UsageError(f"{what}: {path} is a folder; give the checkpoint file (e.g. {os.path.join(path, 'last.pt')})")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{what}: {path} is empty (0 bytes); it was probably cut off while being written")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, a text file, a pickle of something else, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
        raise UsageError(f"{what}: {path} is not a readable PyTorch checkpoint (truncated or another kind of "
                         f"file: {reason})") from None
    if require_train:
        if not (isinstance(obj, dict) and obj.get("format") == CKPT_FORMAT):
            kind = f"format {obj.get('format')!r}" if isinstance(obj, dict) and "format" in obj else \
                ("a plain state_dict" if isinstance(obj, dict) else f"a {type(obj).__name__}")
            raise UsageError(f"{what}: {path} is not an awpfast-train checkpoint ({kind}); give a last.pt or "
                             "best.pt written by awpfast-train")
        missing = [k for k in ("epoch", "model", "optimizer", "scheduler", "rng", "history", "best", "args")
                   if k not in obj]
        if missing:
            raise UsageError(f"{what}: {path} is an incomplete awpfast-train checkpoint (no {', '.join(missing)})")
    return obj


def run_files(out: str) -> List[str]:
    """The files in ``out`` that make it hold a run: checkpoints and a non-empty metrics log."""
    if not os.path.isdir(out):
        return []
    found = [f for f in ("last.pt", "best.pt") if os.path.isfile(os.path.join(out, f))]
    mp = os.path.join(out, "metrics.jsonl")
    if os.path.isfile(mp) and os.path.getsize(mp) > 0:
        found.append("metrics.jsonl")
    return found


def _check_out(args, resume_path: Optional[str]) -> None:
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is an existing file, not a folder: choose another --out")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: {parent} is a file, so the folder cannot be created")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out}: {parent} is not writable")
    found = run_files(out)
    if resume_path is not None:
        if args.overwrite:
            raise UsageError("--resume and --overwrite contradict each other: --resume continues the run, "
                             "--overwrite starts it over")
        last = os.path.join(out, "last.pt")
        if found and not (os.path.isfile(last) and os.path.samefile(last, resume_path)):
            raise UsageError(f"--resume {resume_path} would continue into --out {out}, which holds another run "
                             f"({', '.join(found)}): choose a new --out for the continuation")
    elif found and not args.overwrite:
        raise UsageError(f"--out {out} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                         "--overwrite to replace it, or choose another --out")


def make_config(args: argparse.Namespace, explicit: Optional[set] = None) -> RunConfig:
    """Validate ``args`` (parsed by :func:`build_parser`) into a :class:`RunConfig`.

    Reads the ``--resume`` checkpoint (and nothing else) from disk, writes nothing. ``explicit``:
    the options given on the command line (for notes about options that ``--resume`` ignores);
    default: those that differ from the parser's defaults."""
    args = copy.copy(args)
    if hasattr(args, "_explicit"):
        del args._explicit
    for key, val in _NEW_OPTION_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, val)
    defaults = vars(build_parser().parse_args([]))
    if explicit is None:
        explicit = {k for k, v in vars(args).items() if v is not None and v != defaults.get(k)}
    dist = _dist_from_env(args)
    notes: List[str] = []
    ckpt = resume_path = None
    if args.resume is not None:
        if args.out is None and args.resume:
            args.out = os.path.dirname(os.path.abspath(args.resume))
        if args.out is None:
            raise UsageError("--resume without a path needs --out DIR (the run to continue)")
        resume_path = args.resume or os.path.join(args.out, "last.pt")
        ckpt = read_checkpoint(resume_path, "--resume")
        saved = dict(ckpt["args"])
        for k in _RUN_KEYS:
            old = saved.get(k, _OLD_RUN_DEFAULTS.get(k))
            given = getattr(args, k, None)
            if k in explicit and given != old:
                notes.append(f"--resume: {_opt(k)} {given!r} differs from the checkpoint's {old!r}; "
                             "using the checkpoint's")
            setattr(args, k, old)
        if args.epochs is None:
            args.epochs = saved["epochs"]
        elif args.epochs != saved["epochs"] and args.lr_schedule != "constant":
            notes.append(f"--resume: --epochs {args.epochs} (the checkpoint planned {saved['epochs']}) also "
                         f"stretches the {args.lr_schedule} LR schedule to {args.epochs} epochs")
    else:
        apply_recipe(args, explicit)
    resolve_defaults(args)
    validate_args(args)
    if dist.enabled and args.batch_size % dist.world_size:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch and must split evenly over "
                         f"{dist.world_size} processes")
    if dist.mode == "fsdp" and args.compile:
        raise UsageError("--fsdp with --compile is not supported yet: drop one of them")
    if dist.mode == "fsdp" and args.track_flatness:
        raise UsageError("--track-flatness is not supported with --fsdp yet (the landscape moves whole weights): "
                         "use DDP (the default under torchrun) or drop --track-flatness")
    device = resolve_device(args.device, dist)
    _check_out(args, resume_path)
    if ckpt is not None:
        done = int(ckpt["epoch"])
        if done >= args.epochs:
            raise UsageError(f"nothing to resume: the run in {args.out} already finished {done} of {args.epochs} "
                             f"epochs; pass --epochs N (> {done}) to train longer")
    return RunConfig(args=args, device=device, dist=dist, resume_path=resume_path, checkpoint=ckpt, notes=notes)


# ----------------------------------------------------------------------------- pieces
def lr_factor(schedule: str, t: float, epochs: int) -> float:
    """LR multiplier at (fractional) epoch ``t``: the step of iteration ``i`` (0-based) of 0-based
    epoch ``e`` out of ``n`` uses ``t = e + (i + 1) / n`` (the AT reference's convention).

    ``piecewise``: x0.1 once ``t >= epochs / 2``, x0.01 once ``t >= 3 epochs / 4`` (per iteration).
    ``piecewise-epoch``: the same by whole epochs: the 1-based epoch ``ceil(t)`` runs at x0.1 from
    ``epochs / 2`` on and at x0.01 from ``3 epochs / 4`` on (the TRADES reference's epochs 100 and
    150 of 200, for all of their iterations)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(t, epochs) / epochs))
    if schedule == "piecewise-epoch":
        epoch = math.ceil(t - 1e-9)  # 1-based
        return 1.0 if epoch < 0.5 * epochs else (0.1 if epoch < 0.75 * epochs else 0.01)
    if t / epochs < 0.5:
        return 1.0
    if t / epochs < 0.75:
        return 0.1
    return 0.01


def build_model(name: str, num_classes: int, in_channels: int = 3, width: Optional[int] = None,
                input_norm: str = "none"):
    """A model by its CLI name; ``input_norm``: ``"none"`` or ``"cifar10"`` (mean/std inside the model)."""
    from .models import create_model
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {', '.join(INPUT_NORMS)}, got {input_norm!r}")
    kw = {"width": width} if (name == "small-cnn" and width) else {}
    mean, std = INPUT_NORMS[input_norm]
    if mean is not None:
        if in_channels != len(mean):
            raise ValueError(f"input_norm {input_norm!r} has {len(mean)} channels, the data {in_channels}")
        kw.update(mean=mean, std=std)
    return create_model(name, num_classes=num_classes, in_channels=in_channels, **kw)


def _autocast(device: torch.device, amp: Optional[str]):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def make_attack(model, args, steps: int, train: bool):
    """The training (TRADES KL or PGD) or evaluation (PGD) attack of a run."""
    kw = dict(eps=args.eps, alpha=args.alpha, steps=steps, random_start=True, norm=args.norm,
              bn_train=(train and args.attack_bn == "train"), backend=args.backend)
    if train and args.method == "trades":
        return TRADESAttack(model, l2_order=getattr(args, "trades_l2_order", "renorm-clamp"), **kw)
    return PGD(model, **kw)


def _dist_sum(values: List[float], device, world_size: int) -> List[float]:
    if world_size == 1:
        return values
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def evaluate_split(model, split, batch_size: int, eps: float, alpha: float, steps: int, norm: str = "Linf",
                   device="cpu", amp: Optional[str] = None, channels_last: bool = False, limit: Optional[int] = None,
                   backend: Optional[str] = None, random_start: bool = True, rank: int = 0,
                   world_size: int = 1) -> dict:
    """Clean and PGD-``steps`` accuracy (and mean CE) on a split, in eval mode.

    With ``world_size > 1`` each process evaluates every ``world_size``-th example of the first
    ``limit`` and the sums are all-reduced: every process returns the same numbers. The shards
    are padded to equal length (padding examples are not counted), so that every process runs
    the same number of forwards, as FSDP needs."""
    device = torch.device(device)
    split = split.subset(limit)
    real = None
    if world_size > 1:
        from .data import Split
        total = len(split)
        per = -(-total // world_size)
        pos = (torch.arange(per * world_size) % max(total, 1))[rank::world_size] if total else torch.arange(0)
        real = (torch.arange(per * world_size) < total)[rank::world_size].to(device)
        split = Split(split.x[pos], split.y[pos])
    attack = PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, norm=norm, backend=backend)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    was = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    n = 0
    try:
        for x, y in Batches(split, batch_size, device=device):
            if x.dtype != dtype and dtype == torch.float64:
                x = x.to(dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp):
                with torch.no_grad():
                    lc = model(x).float()
                x_adv = attack(x, y) if steps > 0 else x
                with torch.no_grad():
                    lr_ = model(x_adv).float()
            w = torch.ones(len(y), dtype=torch.float64, device=device) if real is None \
                else real[n:n + len(y)].double()
            n += len(y)
            sums += torch.stack([((lc.argmax(1) == y).double() * w).sum(), ((lr_.argmax(1) == y).double() * w).sum(),
                                 (F.cross_entropy(lc, y, reduction="none").double() * w).sum(),
                                 (F.cross_entropy(lr_, y, reduction="none").double() * w).sum()])
    finally:
        model.train(was)
    if real is not None:
        n = int(real.sum())
    c_ok, r_ok, c_loss, r_loss, n = _dist_sum(sums.tolist() + [float(n)], device, world_size)
    n = int(n)
    d = max(n, 1)
    return {"clean_acc": c_ok / d, "robust_acc": r_ok / d, "clean_loss": c_loss / d, "robust_loss": r_loss / d,
            "n": n}


def plot_metrics(history, path: str, title: str = "") -> Optional[str]:
    """Train/test clean and robust accuracy per epoch (and train loss) to a PNG; with
    ``--track-flatness`` a third panel shows the flatness next to the robust generalization gap
    (train PGD accuracy - test PGD accuracy, in points)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _note("matplotlib is not installed: no plot (pip install matplotlib)")
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


def _note(msg: str) -> None:
    print(f"awpfast-train: note: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- phases
@dataclass
class Trainer:
    """The live objects of a run (built by :func:`setup`)."""
    cfg: RunConfig
    ds: object
    train_split: object
    val_split: object
    model: torch.nn.Module          # the plain module (what checkpoints hold)
    wrapped: torch.nn.Module        # DDP / FSDP-wrapped, or ``model`` itself
    fwd: torch.nn.Module            # the training forward (maybe compiled)
    eval_fwd: torch.nn.Module       # attacks and evaluation (never a DDP wrapper)
    awp: AWP
    sched: object
    scaler: object
    loss_fn: object                 # the descent loss at w + v (in the run's forward order)
    attack: object
    batches: Batches
    n_iter: int
    ascent_loss_fn: object = None   # the AWP ascent loss (BN statistics frozen there: the order is moot)
    dtype: torch.dtype = torch.float32
    start: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=dict)

    def say(self, *a) -> None:
        if self.cfg.dist.is_main and not self.cfg.args.quiet:
            print(*a, flush=True)


def _init_distributed(cfg: RunConfig) -> None:
    import torch.distributed as dist
    if not cfg.dist.enabled or dist.is_initialized():
        return
    if cfg.device.type == "cuda":
        torch.cuda.set_device(cfg.device)
    dist.init_process_group(backend="nccl" if cfg.device.type == "cuda" else "gloo", init_method="env://")


def _wrap(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    if cfg.dist.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[cfg.device.index] if cfg.device.type == "cuda" else None)
    if cfg.dist.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for unit in _shard_units(model):
            fully_shard(unit)
        fully_shard(model)
        return model
    return model


def _shard_units(model: torch.nn.Module) -> list:
    """The submodules FSDP2 shards one by one: residual blocks, or the small CNN's layers."""
    from .models.preactresnet import PreActBlock
    from .models.wideresnet import BasicBlock
    units = [m for m in model.modules() if isinstance(m, (PreActBlock, BasicBlock))]
    if not units and hasattr(model, "features"):
        units = [m for m in model.features if any(True for _ in m.parameters())]
    return units


def symmetric_label_noise(split: Split, p: float, num_classes: int, seed: int = LABEL_NOISE_SEED) -> Split:
    """``split`` with symmetric label noise: exactly ``round(p * len(split))`` examples, chosen by a
    seeded permutation, get a label drawn uniformly from the ``num_classes - 1`` other classes.
    The images are shared, the labels copied; the same arguments give the same labels."""
    n = len(split)
    k = int(round(float(p) * n))
    if k == 0 or num_classes < 2:
        return split
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=g)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=g)  # 1..K-1: never the original class
    y = split.y.clone()
    y[idx] = (y[idx] + shift) % num_classes
    return Split(split.x, y)


def training_splits(ds, val_samples: Optional[int], train_samples: Optional[int] = None, label_noise: float = 0.0):
    """``(train, val)``: the images a run trained on and its held-out validation images, from the
    dataset and the run's ``val_samples`` / ``train_samples`` / ``label_noise`` (``checkpoint["args"]``;
    a checkpoint without ``val_samples`` held none out). Label noise applies to the training
    images only (after the hold-out and the ``train_samples`` cut), never to ``val``."""
    try:
        train, val = split_validation(ds.train, int(val_samples or 0))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if train_samples is not None:
        train = train.subset(train_samples)
    if label_noise:
        train = symmetric_label_noise(train, label_noise, ds.num_classes)
    return train, val


def setup(cfg: RunConfig) -> Trainer:
    """Data, model, optimizer with AWP, schedule, attack and loader; loads the ``--resume`` state.
    Writes nothing."""
    args, device, dist = cfg.args, cfg.device, cfg.dist
    if args.threads:
        torch.set_num_threads(args.threads)
    seed = args.seed + dist.rank  # different attack random starts per process; the loader is shared
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    ds = load_dataset(args.data, args.data_dir, args.image_size)
    train, val = training_splits(ds, args.val_samples, args.train_samples, args.label_noise)
    augment = ds.augment if args.augment == "auto" else args.augment
    dtype = DTYPES[args.dtype]
    model = build_model(args.model, ds.num_classes, ds.in_channels, args.width, args.input_norm).to(device, dtype)
    ckpt = cfg.checkpoint
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UsageError(f"--resume {cfg.resume_path}: the weights do not fit {args.model} "
                             f"({str(e).splitlines()[0]})") from None
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    inner = torch.compile(model) if args.compile else model
    wrapped = _wrap(inner, cfg)
    fwd = wrapped
    eval_fwd = wrapped if dist.mode == "fsdp" else inner  # FSDP: every forward goes through the sharded module
    params = model.parameters()
    base = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    # the DDP / FSDP-wrapped model under torchrun (AWP detects it); one process: the plain module
    awp = AWP(base, wrapped if dist.enabled else model, gamma=args.awp_gamma, steps=args.awp_steps,
              restore=args.awp_restore, backend=args.backend)
    batches = Batches(train, args.batch_size, shuffle=True, augment=augment, seed=args.seed, drop_last=False,
                      device=device, pad_mode=args.pad_mode, rank=dist.rank, world_size=dist.world_size)
    n_iter = len(batches)
    epochs = args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(awp, lambda k: lr_factor(args.lr_schedule, (k + 1) / n_iter, epochs))
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    t = Trainer(cfg=cfg, ds=ds, train_split=train, val_split=val, model=model, wrapped=wrapped, fwd=fwd,
                eval_fwd=eval_fwd, awp=awp, sched=sched, scaler=scaler,
                loss_fn=get_loss(args.method, args.beta, args.forward_order),
                ascent_loss_fn=get_loss(args.method, args.beta),
                attack=make_attack(eval_fwd, args, args.attack_steps, train=True), batches=batches, n_iter=n_iter,
                dtype=dtype, best={"epoch": None, "selected_on": "val" if len(val) else "test"})
    if ckpt is not None:
        _load_optimizer(awp, model, ckpt["optimizer"], dist)
        sched.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"]
        per_rank = ckpt.get("rng_ranks")
        if dist.enabled and per_rank and len(per_rank) == dist.world_size:
            rng = per_rank[dist.rank]
        elif dist.rank > 0:  # another world size: continue the data order, fresh attack noise per process
            rng = dict(rng, torch=torch.manual_seed(seed + 7919 * int(ckpt["epoch"])).get_state())
        _set_rng_state(rng, batches)
        t.start, t.history, t.best = int(ckpt["epoch"]), list(ckpt["history"]), dict(ckpt["best"])
        t.best.setdefault("selected_on", "test")
    return t


def prepare_out(t: Trainer) -> None:
    """Create ``--out`` (rank 0), drop a replaced run's files (``--overwrite``) and record the options."""
    cfg = t.cfg
    if not cfg.dist.is_main:
        return
    out = cfg.args.out
    os.makedirs(out, exist_ok=True)
    if cfg.args.overwrite and cfg.checkpoint is None:
        for f in RUN_FILES:
            p = os.path.join(out, f)
            if os.path.isfile(p):
                os.remove(p)
    rec = {k: v for k, v in vars(cfg.args).items()}
    rec["world_size"] = cfg.dist.world_size
    if cfg.args.recipe:  # the options given explicitly that moved the run away from its recipe
        rec["recipe_overrides"] = recipe_overrides(cfg.args)
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(rec, f, indent=1, sort_keys=True)


def epoch_gamma(args, epoch: int) -> float:
    """The AWP gamma of 0-based ``epoch``: 0 during the first ``awp_warmup`` epochs."""
    return args.awp_gamma if epoch >= args.awp_warmup else 0.0


def eps_ramp(eps_warmup: int, t: float) -> float:
    """``--eps-warmup``: the fraction of ``--eps`` (and of ``--alpha``) that the training attack uses at
    fractional epoch ``t`` (iteration ``i`` of 0-based epoch ``e`` out of ``n``: ``t = e + (i + 1) / n``,
    the LR schedule's clock): ``min(1, t / eps_warmup)``, 1 without a warm-up."""
    if eps_warmup <= 0:
        return 1.0
    return min(1.0, t / eps_warmup)


def set_train_eps(t: Trainer, epoch: int, i: int) -> float:
    """Set the training attack's radius and step for iteration ``i`` of 0-based ``epoch`` (see
    :func:`eps_ramp`); returns the radius. The evaluation and flatness attacks are separate objects
    and keep the full ``--eps``."""
    args = t.cfg.args
    f = eps_ramp(getattr(args, "eps_warmup", 0), epoch + (i + 1) / t.n_iter)
    t.attack.eps, t.attack.alpha = args.eps * f, args.alpha * f
    return t.attack.eps


def train_step(t: Trainer, x: torch.Tensor, y: torch.Tensor):
    """One training step on the batch ``(x, y)``: attack, AWP ascent, descent at ``w + v``, restore,
    LR schedule; returns ``(loss, logits_adv)`` of the descent pass at ``w + v``.

    With ``--forward-order reference`` BatchNorm is fed as in the reference scripts: AT runs,
    after a train-mode attack, the extra loss forward on ``x_adv`` that the reference attack makes
    to keep its best restart, and after the restore a clean train-mode forward (the reference logs
    its accuracy); TRADES runs its forwards at ``w + v`` adversarial, clean, clean (see
    :class:`awpfast.losses.TRADESLoss`). These extra forwards run without gradient."""
    args, device = t.cfg.args, t.cfg.device
    reference_at = args.forward_order == "reference" and args.method == "at"
    if x.dtype != t.dtype:
        x = x.to(t.dtype)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(device, args.amp):
        x_adv = t.attack(x, y)
    t.model.train()
    if reference_at and args.attack_bn == "train":
        with torch.no_grad(), _autocast(device, args.amp):
            t.eval_fwd(x_adv)
    scale = t.scaler.get_scale() if t.scaler is not None else 1.0

    def closure():
        with _autocast(device, args.amp):
            return t.ascent_loss_fn(t.fwd, x, x_adv, y) * scale

    with t.awp.perturbed(closure):
        t.awp.zero_grad(set_to_none=True)
        with _autocast(device, args.amp):
            loss, logits_adv = t.loss_fn(t.fwd, x, x_adv, y, return_logits=True)
        if t.scaler is not None:
            t.scaler.scale(loss).backward()
            t.scaler.step(t.awp)
            t.scaler.update()
        else:
            loss.backward()
            t.awp.step()
    if reference_at:
        with torch.no_grad(), _autocast(device, args.amp):
            t.eval_fwd(x)
    t.sched.step()
    return loss, logits_adv


def train_epoch(t: Trainer, epoch: int) -> dict:
    """One pass of adversarial training with AWP (:func:`train_step` per batch); returns loss /
    accuracy / timing (global under torchrun)."""
    args, device = t.cfg.args, t.cfg.device
    t.awp.set_gamma(epoch_gamma(args, epoch))
    t.model.train()
    t0 = time.perf_counter()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss * n, correct: no host sync per step
    n_local = 0
    bar = None
    if t.cfg.dist.is_main and not (args.no_progress or args.quiet) and sys.stderr.isatty():
        try:
            from tqdm import tqdm
            bar = tqdm(total=t.n_iter, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    eps_now, ramp = args.eps, getattr(args, "eps_warmup", 0)
    for i, (x, y) in enumerate(t.batches):
        if ramp:
            eps_now = set_train_eps(t, epoch, i)
        loss, logits_adv = train_step(t, x, y)
        sums += torch.stack([loss.detach().double() * len(y), (logits_adv.detach().argmax(1) == y).sum().double()])
        n_local += len(y)
        if bar is not None:
            s = sums.tolist()
            el = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{s[0] / n_local:.4f}", acc=f"{100 * s[1] / n_local:.1f}%",
                            img_s=f"{n_local * t.cfg.dist.world_size / max(el, 1e-9):.0f}")
    if bar is not None:
        bar.close()
    loss_sum, ok, n = _dist_sum(sums.tolist() + [float(n_local)], device, t.cfg.dist.world_size)
    train_time = time.perf_counter() - t0
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}; lower --lr or drop --amp fp16 "
                                 f"(last.pt still holds epoch {epoch})")
    rec = {"train_loss": loss_sum / n, "train_adv_acc": ok / n, "train_time_s": train_time,
           "img_per_s": n / max(train_time, 1e-9)}
    if ramp:
        rec["train_eps"] = eps_now  # the radius of the epoch's last step
    return rec


def full_eval_due(args, epoch: int) -> bool:
    """Whether 0-based ``epoch`` evaluates the test split and the training subset on the
    ``--eval-every`` schedule (every K-th epoch and the last one)."""
    every = getattr(args, "eval_every", 1) or 1
    return (epoch + 1) % every == 0 or epoch + 1 == args.epochs


def evaluate_epoch(t: Trainer, epoch: Optional[int] = None) -> dict:
    """Clean and PGD accuracy on the validation split, the test split and a training subset (and the
    flatness with ``--track-flatness``) after 0-based ``epoch`` (default: the next one in the history).
    With ``--eval-every K`` the test split and the training subset are evaluated on that schedule and
    whenever the validation PGD accuracy beats the best so far; otherwise their entries are ``None``."""
    args, cfg = t.cfg.args, t.cfg
    epoch = len(t.history) if epoch is None else epoch
    t1 = time.perf_counter()
    if cfg.dist.enabled:
        import torch.distributed as dist
        for b in t.model.buffers():  # evaluate (and save) rank 0's BatchNorm statistics everywhere
            dist.broadcast(b, 0)
    ev = dict(batch_size=max(args.batch_size // cfg.dist.world_size, 128), eps=args.eps, alpha=args.alpha,
              steps=args.eval_steps, norm=args.norm, device=cfg.device, amp=args.amp,
              channels_last=args.channels_last, backend=args.backend, rank=cfg.dist.rank,
              world_size=cfg.dist.world_size)
    rec = {}
    va = evaluate_split(t.eval_fwd, t.val_split, **ev) if len(t.val_split) else None
    scheduled = full_eval_due(args, epoch)
    best_val = t.best.get("val_robust_acc") if t.best else None
    full = scheduled or (va is not None and (best_val is None or va["robust_acc"] > best_val))
    te = evaluate_split(t.eval_fwd, t.ds.test, limit=args.eval_samples, **ev) if full else None
    tr = evaluate_split(t.eval_fwd, t.train_split, limit=args.train_eval_samples, **ev) \
        if (args.train_eval_samples and full) else None
    rec["val_clean_acc"] = va["clean_acc"] if va else None
    rec["val_robust_acc"] = va["robust_acc"] if va else None
    rec["train_clean_acc"] = tr["clean_acc"] if tr else None
    rec["train_robust_acc"] = tr["robust_acc"] if tr else None
    rec.update({k: (te[v] if te else None) for k, v in (("test_clean_acc", "clean_acc"), ("test_robust_acc", "robust_acc"),
                                                        ("test_clean_loss", "clean_loss"),
                                                        ("test_robust_loss", "robust_loss"))})
    rec["eval_time_s"] = time.perf_counter() - t1
    if args.track_flatness and scheduled:
        rec.update(flatness_epoch(t))
    return rec


def flatness_epoch(t: Trainer) -> dict:
    """``--track-flatness``: the flatness of the adversarial weight loss landscape at the current weights.

    ``flatness = mean over d of [L(w + alpha d) - L(w)]``: ``L`` the mean cross-entropy on PGD
    examples (``--flatness-steps`` steps, the run's ``--eps`` / ``--alpha`` / ``--norm``; regenerated
    against the perturbed weights) of the first ``--flatness-samples`` training images, eval mode;
    ``d`` the ``--flatness-directions`` filter-normalized directions of :func:`awpfast.landscape.flatness`
    drawn with fixed seeds (the same Gaussian draws every epoch, rescaled to the current filter norms);
    ``alpha`` = ``--flatness-alpha``. Weights, buffers, modes and RNG states are restored bitwise, so
    the training trajectory does not change. Under torchrun (DDP) rank 0 computes it on its replica and
    broadcasts the numbers: every process records the same values. Returns ``{"flatness",
    "flatness_loss0", "flatness_time_s"}``."""
    from .landscape import flatness
    args, cfg = t.cfg.args, t.cfg
    t0 = time.perf_counter()
    vals = torch.zeros(2, dtype=torch.float64)
    if cfg.dist.is_main:
        sub = t.train_split.subset(args.flatness_samples)
        attack = PGD(t.model, eps=args.eps, alpha=args.alpha, steps=args.flatness_steps, norm=args.norm,
                     random_start=True, backend=args.backend) if args.flatness_steps > 0 else None
        res = flatness(t.model, sub.x, sub.y, args.flatness_alpha, args.flatness_directions, attack,
                       seed=FLATNESS_SEED, batch_size=max(args.batch_size // cfg.dist.world_size, 128),
                       backend=args.backend, details=True)
        vals = torch.tensor([res["flatness"], res["loss0"]], dtype=torch.float64)
    if cfg.dist.enabled:
        import torch.distributed as dist
        buf = vals.to(cfg.device)
        dist.broadcast(buf, 0)
        vals = buf.cpu()
    return {"flatness": float(vals[0]), "flatness_loss0": float(vals[1]),
            "flatness_time_s": time.perf_counter() - t0}


def _param_names(model: torch.nn.Module) -> List[str]:
    return [n for n, _ in model.named_parameters()]


def _full_state_dicts(t: Trainer):
    """The model's and the optimizer's state dicts in the one-process layout (FSDP: gathered on rank 0),
    so that any checkpoint resumes on any number of processes."""
    if t.cfg.dist.mode != "fsdp":
        return t.model.state_dict(), t.awp.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(t.model, options=opts)
    osd = get_optimizer_state_dict(t.model, t.awp.optimizer, options=opts)  # keyed by parameter names
    awp_sd = t.awp.state_dict()  # the base optimizer's (sharded) state dict plus the wrapper's own entries
    if not t.cfg.dist.is_main:
        return msd, awp_sd
    ids = {}
    for g in osd["param_groups"]:
        for name in g["params"]:
            ids.setdefault(name, len(ids))
    full = {"state": {ids[k]: v for k, v in osd["state"].items()},
            "param_groups": [dict(g, params=[ids[n] for n in g["params"]]) for g in osd["param_groups"]]}
    if "base_optimizer" in awp_sd:  # the {"base_optimizer", "awp"} layout of older awpfast versions
        awp_sd["base_optimizer"] = full
    else:
        awp_sd.update(full)
    return msd, awp_sd


def _load_optimizer(awp: AWP, model: torch.nn.Module, sd: dict, dist: DistInfo) -> None:
    """Load a one-process-layout AWP state dict (FSDP: sharded onto this rank's parameters)."""
    if dist.mode != "fsdp":
        awp.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = _param_names(model)
    base = sd["base_optimizer"] if "base_optimizer" in sd else {"state": sd["state"],
                                                                 "param_groups": sd["param_groups"]}
    by_name = {"state": {names[i]: v for i, v in base["state"].items()},
               "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in base["param_groups"]]}
    set_optimizer_state_dict(model, awp.optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    sharded = awp.optimizer.state_dict()
    if "base_optimizer" in sd:
        awp.load_state_dict({"base_optimizer": sharded, "awp": sd.get("awp", {})})
    else:
        awp.load_state_dict(dict(sharded, **{k: v for k, v in sd.items() if k not in ("state", "param_groups")}))


def save_checkpoint(t: Trainer, epoch: int, is_best: bool) -> None:
    """``last.pt`` (and ``best.pt``), ``metrics.jsonl`` and the plot; written by rank 0 only."""
    cfg, args = t.cfg, t.cfg.args
    rng = _rng_state(t.batches)
    rng_ranks = None
    if cfg.dist.enabled:
        import torch.distributed as dist
        rng_ranks = [None] * cfg.dist.world_size
        dist.all_gather_object(rng_ranks, rng)
    model_sd, optim_sd = _full_state_dicts(t)  # collective under FSDP
    if not cfg.dist.is_main:
        return
    state = {"format": CKPT_FORMAT, "epoch": epoch + 1, "model": model_sd,
             "optimizer": optim_sd, "scheduler": t.sched.state_dict(),
             "scaler": t.scaler.state_dict() if t.scaler is not None else None,
             "rng": rng, "rng_ranks": rng_ranks, "world_size": cfg.dist.world_size,
             "history": t.history, "best": t.best, "args": vars(args),
             "num_classes": t.ds.num_classes, "in_channels": t.ds.in_channels, "image_size": t.ds.image_size}
    _atomic_save(state, os.path.join(args.out, "last.pt"))
    if is_best:
        _atomic_save(state, os.path.join(args.out, "best.pt"))
    _write_metrics(os.path.join(args.out, "metrics.jsonl"), t.history)
    if not args.no_plot:
        plot_metrics(t.history, os.path.join(args.out, "metrics.png"),
                     title=f"{args.method}{'-AWP' if args.awp_gamma > 0 else ''} {args.model} {args.data} "
                           f"seed {args.seed}" + (f" ({args.recipe})" if args.recipe else "")
                           + (f" noise {args.label_noise:g}" if args.label_noise else ""))


def _pct(v) -> str:
    return "  -  " if v is None else f"{100 * v:.2f}"


def run(args) -> dict:
    """Train with parsed ``args`` (see :func:`build_parser`) or a :class:`RunConfig`; returns the summary."""
    cfg = args if isinstance(args, RunConfig) else make_config(args, getattr(args, "_explicit", None))
    args = cfg.args
    if cfg.dist.is_main:
        for n in cfg.notes:
            _note(n)
    _init_distributed(cfg)
    t = setup(cfg)
    out_existed = os.path.isdir(args.out)
    try:
        prepare_out(t)
        return _train_loop(t)
    except BaseException:
        # a run that failed before writing anything leaves no empty folder behind
        if cfg.dist.is_main and not out_existed and os.path.isdir(args.out) and not run_files(args.out):
            for f in ("args.json",):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(args.out, f))
            with contextlib.suppress(OSError):
                os.rmdir(args.out)
        raise


def _train_loop(t: Trainer) -> dict:
    cfg, args = t.cfg, t.cfg.args
    if cfg.checkpoint is not None:
        t.say(f"resumed from epoch {t.start} ({cfg.resume_path})")
    ds = t.ds
    t.say(f"awpfast-train: {args.method}{' + AWP(gamma=%g)' % args.awp_gamma if args.awp_gamma > 0 else ''}"
          + (f" [recipe {args.recipe}]" if args.recipe else "")
          + (f" [label noise {args.label_noise:g}]" if args.label_noise else "") + " | "
          f"{args.model} on {args.data} ({len(t.train_split)} train / {len(t.val_split)} val / {len(ds.test)} test, "
          f"{ds.image_size}px) | {args.norm} eps={args.eps:.4g} alpha={args.alpha:.4g}"
          + (f" (ramped over {args.eps_warmup} epochs)" if getattr(args, "eps_warmup", 0) else "") + f" | {cfg.device}"
          + (f" x {cfg.dist.world_size} ({cfg.dist.mode})" if cfg.dist.enabled else "") + f" | out={args.out}")
    sel = "val_robust_acc" if len(t.val_split) else "test_robust_acc"
    stop_at = args.epochs if args.stop_after is None else min(args.epochs, t.start + args.stop_after)
    for epoch in range(t.start, stop_at):
        rec = {"epoch": epoch + 1, "lr": t.awp.param_groups[0]["lr"], "awp_gamma": None}
        tr = train_epoch(t, epoch)
        rec["awp_gamma"] = t.awp.param_groups[0]["awp_gamma"]
        rec.update(tr)
        rec.update(evaluate_epoch(t, epoch))
        t.history.append(rec)
        prev = t.best.get(sel)
        is_best = rec[sel] is not None and (prev is None or rec[sel] > prev)
        if is_best:
            t.best = {"epoch": epoch + 1, "selected_on": sel.split("_")[0], "val_robust_acc": rec["val_robust_acc"],
                      "test_robust_acc": rec["test_robust_acc"], "test_clean_acc": rec["test_clean_acc"]}
        save_checkpoint(t, epoch, is_best)
        t.say(f"epoch {epoch + 1:3d}/{args.epochs} lr {rec['lr']:.4g} loss {rec['train_loss']:.4f} | "
              f"val PGD-{args.eval_steps} {_pct(rec['val_robust_acc'])} | "
              f"train clean {_pct(rec['train_clean_acc'])} PGD {_pct(rec['train_robust_acc'])} | "
              f"test clean {_pct(rec['test_clean_acc'])} PGD {_pct(rec['test_robust_acc'])} | "
              + (f"flatness {rec['flatness']:.4f} ({rec['flatness_time_s']:.1f}s) | " if rec.get("flatness") is not None else "")
              + f"{rec['img_per_s']:.0f} img/s, {rec['train_time_s']:.1f}s + eval {rec['eval_time_s']:.1f}s"
              + ("  *best" if is_best else ""))
    history, best = t.history, t.best
    summary = {"out": args.out, "epochs_done": len(history), "best": best, "last": history[-1] if history else None}
    if history:
        last = history[-1]
        t.say(f"done: best epoch {best['epoch']} (by {best['selected_on']} PGD-{args.eval_steps}): test clean "
              f"{_pct(best['test_clean_acc'])}% PGD-{args.eval_steps} {_pct(best['test_robust_acc'])}% | last epoch "
              f"{last['epoch']}: test clean {_pct(last['test_clean_acc'])}% PGD-{args.eval_steps} "
              f"{_pct(last['test_robust_acc'])}% | {args.out}")
    return summary


def _error_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (UsageError, FileNotFoundError, ImportError)):
        return text
    return f"{type(e).__name__}: {text} (set {_DEBUG_ENV}=1 for the traceback)"


def cli_main(prog: str, parse, body) -> int:
    """Run ``body()`` as a CLI: one-line errors (exit 2 for bad input, 1 for failures), no
    traceback unless ``AWPFAST_DEBUG=1``; only rank 0 reports bad input under torchrun."""
    debug = os.environ.get(_DEBUG_ENV, "") not in ("", "0")
    try:
        return body(parse())
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        usage = isinstance(e, (UsageError, FileNotFoundError, ImportError))
        rank = os.environ.get("RANK")
        if not usage or rank in (None, "0"):
            where = f" [rank {rank}]" if (rank is not None and not usage) else ""
            print(f"{prog}: error{where}: {_error_line(e)}", file=sys.stderr)
        return 2 if usage else 1
    finally:
        with contextlib.suppress(Exception):
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


def main(argv=None) -> int:
    """``awpfast-train``: returns the exit status (0 ok, 2 bad input, 1 failure)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)

    def parse():
        args = parser.parse_args(argv)
        args._explicit = explicit_options(parser, argv)
        return args

    def body(args):
        run(args)
        return 0

    return cli_main("awpfast-train", parse, body)


if __name__ == "__main__":
    sys.exit(main())
