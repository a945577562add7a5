"""The weight loss landscape (Wu et al. 2020, Figure 1) and a flatness number.

``g(alpha) = L(w + alpha * d)``: the mean cross-entropy of the model at weights ``w + alpha*d``,
on clean inputs or on adversarial examples **regenerated against the perturbed model** at every
``alpha`` (pass an attack such as :class:`awpfast.attacks.PGD` built on the same model). ``d``
is a Gaussian direction, *filter-normalized* (Li et al. 2018): every parameter with ``ndim > 1``
gets a Gaussian tensor whose filters (slices along dim 0) are rescaled to the norms of the
weight's filters; biases and BatchNorm parameters get ``d = 0``.

Python::

    from awpfast.attacks import PGD
    from awpfast.landscape import filter_normalized_direction, weight_landscape, flatness

    d = filter_normalized_direction(model, seed=0)
    attack = PGD(model, eps=8/255, alpha=2/255, steps=10)
    res = weight_landscape(model, x_test, y_test, [-1, -0.5, 0, 0.5, 1], direction=d, attack=attack)
    res["alpha"], res["loss"], res["acc"]

    flat = flatness(model, x_train_subset, y_train_subset, 0.5, 3, attack)   # one number

Command line (awpfast-train checkpoints, e.g. AT against AT-AWP)::

    python -m awpfast.landscape runs/at/last.pt runs/at-awp/last.pt --alphas -1:1:21 \\
        --directions 3 --samples 1000 --attack-steps 10 --out landscape/

writes ``landscape.json`` and ``landscape.png`` (the checkpoints overlaid) to ``--out``.

Guarantees of :func:`weight_landscape` (and :func:`flatness`): the model is evaluated in eval
mode; afterwards the weights are bitwise what they were, the buffers (BatchNorm running
statistics) are untouched, every submodule's train/eval flag is restored and the global RNG
state is unchanged, also when the attack or the model raises midway. Moving to ``w + alpha*d``
is one call of the seam op :func:`awpfast.ops.add_scaled_` per ``alpha`` (``params <- backups +
alpha * d``, every backend, no per-layer Python loop). The data are evaluated in batches, so a
10k-image test set on the CPU is fine with the model on a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .attacks import attack_mode
from .checkpoint import read_checkpoint
from .cli import USAGE_ERRORS, UsageError, check_out_dir, cli_main, parse_float, resolve_device
from .perturb import flat, flat_like

__all__ = ["filter_normalized_direction", "weight_landscape", "flatness", "parse_alphas", "main"]

Direction = Dict[str, torch.Tensor]
LANDSCAPE_FORMAT = "awpfast-landscape/1"
_IGNORE = (None, "none", "biasbn")


# ============================================================================ directions
def filter_normalized_direction(model: nn.Module, seed: int = 0, ignore: Optional[str] = "biasbn") -> Direction:
    """A seeded, filter-normalized Gaussian direction: ``{parameter name: tensor}``.

    Every parameter with ``ndim > 1`` gets ``d ~ N(0, 1)`` with each filter ``d[i]`` (the slice
    along dim 0) rescaled to ``||w[i]||`` (Li et al. 2018): ``d[i] * ||w[i]|| / ||d[i]||``, computed
    in float64 (a filter of zeros gets a zero direction).
    1-D parameters (biases, BatchNorm weights and biases) get zeros with ``ignore="biasbn"``
    (the default, and the paper's choice); with ``ignore=None`` they get ``d = w`` (the
    convention of Li et al.'s code for a "filter" of one element).

    The Gaussian numbers are drawn in float64 from a CPU generator seeded with ``seed``, in
    ``model.named_parameters()`` order, then cast to each parameter's dtype and device: one seed
    gives the same direction on every device and dtype, and for two models of one architecture
    the same Gaussian draw rescaled to each model's filter norms.
    """
    if ignore not in _IGNORE:
        raise ValueError(f"ignore must be 'biasbn' or None, got {ignore!r}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    out: Direction = {}
    for name, p in model.named_parameters():
        w = p.detach()
        if w.dim() <= 1:
            out[name] = torch.zeros_like(w) if ignore == "biasbn" else w.clone()
            continue
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        w64 = w.to(device="cpu", dtype=torch.float64)
        wn = torch.linalg.vector_norm(w64.reshape(w64.shape[0], -1), dim=1)
        dn = torch.linalg.vector_norm(d.reshape(d.shape[0], -1), dim=1)
        scale = torch.where(dn > 0, wn / dn.clamp_min(1e-300), torch.zeros_like(dn))
        d = d * scale.view(-1, *([1] * (d.dim() - 1)))
        out[name] = d.to(device=w.device, dtype=w.dtype)
    return out


def _directions(model: nn.Module, directions, seed: int) -> List[Direction]:
    if isinstance(directions, bool):
        raise TypeError("directions must be a number of directions or a list of direction dicts")
    if isinstance(directions, int):
        if directions < 1:
            raise ValueError(f"directions must be >= 1, got {directions}")
        return [filter_normalized_direction(model, seed=seed + k) for k in range(directions)]
    if isinstance(directions, dict):
        return [directions]
    out = list(directions)
    if not out:
        raise ValueError("directions is empty: give at least one direction (or a number of directions)")
    return out


# ============================================================================ the landscape
class _Mover:
    """The parameters that a direction moves, their backups and the direction, flat and
    grouped for the seam: ``move(alpha)`` is one ``ops.add_scaled_`` call."""

    def __init__(self, model: nn.Module, direction: Direction, backend: Optional[str]):
        if not isinstance(direction, dict):
            raise TypeError(f"direction must be a dict {{parameter name: tensor}}, got {type(direction).__name__}")
        named = dict(model.named_parameters())
        unknown = [k for k in direction if k not in named]
        if unknown:
            raise ValueError(f"direction names {unknown[:3]}{'...' if len(unknown) > 3 else ''} that are not "
                             "parameters of the model; build it with filter_normalized_direction(model)")
        self.params, self.backups, self.dirs = [], [], []
        for name, p in named.items():
            d = direction.get(name)
            if d is None:
                continue
            if not isinstance(d, torch.Tensor) or d.shape != p.shape:
                raise ValueError(f"direction[{name!r}] has shape {tuple(getattr(d, 'shape', ()))}, the parameter "
                                 f"{tuple(p.shape)}; they must match")
            d = d.detach().to(device=p.device, dtype=p.dtype)
            if not bool(d.any()):  # zeros (biases, BN): leave the parameter alone
                continue
            if not bool(torch.isfinite(d).all()):
                raise ValueError(f"direction[{name!r}] has non-finite values")
            fp = flat(p.data)
            self.params.append(fp)
            self.backups.append(fp.clone())
            self.dirs.append(flat_like(d, p.data).clone())
        self.backend = backend

    def move(self, alpha: float) -> None:
        if not self.params:
            return
        if alpha == 0.0:
            ops.restore_(self.params, self.backups, backend=self.backend)
        else:
            ops.add_scaled_(self.params, self.dirs, float(alpha), base=self.backups, backend=self.backend)

    def restore(self) -> None:
        if self.params:
            ops.restore_(self.params, self.backups, backend=self.backend)


def _first_float(model: nn.Module):
    for t in model.parameters():
        if t.is_floating_point():
            return t
    for t in model.buffers():
        if t.is_floating_point():
            return t
    return None


def _check_alphas(alphas) -> List[float]:
    if isinstance(alphas, (int, float)):
        alphas = [alphas]
    vals = [float(a) for a in alphas]
    if not vals:
        raise ValueError("alphas is empty: give at least one coordinate, e.g. [-1, 0, 1]")
    bad = [a for a in vals if not math.isfinite(a)]
    if bad:
        raise ValueError(f"alphas must be finite, got {bad[0]}")
    return vals


def _check_data(x, y):
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be tensors (images in [0, 1] or uint8, and integer labels)")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x needs a non-empty batch dimension, got shape {tuple(x.shape)}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} labels for {x.shape[0]} images")


def _evaluate(model, x, y, attack, batch_size, device, dtype, seed):
    """Mean CE (float64 sum, one host sync at the end) and accuracy over ``x`` in batches;
    the attack's randomness is seeded identically for every call (common random numbers)."""
    tot_loss = torch.zeros((), dtype=torch.float64, device=device)
    tot_ok = torch.zeros((), dtype=torch.int64, device=device)
    n = x.shape[0]
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        for i in range(0, n, batch_size):
            xb = x[i:i + batch_size].to(device, non_blocking=True)
            xb = xb.to(dtype).div_(255.0) if xb.dtype == torch.uint8 else xb.to(dtype)
            yb = y[i:i + batch_size].to(device, non_blocking=True)
            if attack is not None:
                xb = attack(xb, yb)
            with torch.no_grad():
                logits = model(xb)
                if logits.dtype not in (torch.float32, torch.float64):
                    logits = logits.float()
                tot_loss += F.cross_entropy(logits, yb, reduction="sum").double()
                tot_ok += (logits.argmax(1) == yb).sum()
    return float(tot_loss) / n, int(tot_ok) / n


def weight_landscape(model: nn.Module, x: torch.Tensor, y: torch.Tensor, alphas: Sequence[float],
                     direction: Optional[Direction] = None, attack: Optional[Callable] = None, seed: int = 0,
                     batch_size: int = 256, backend: Optional[str] = None,
                     callback: Optional[Callable[[int, float, float, float], None]] = None) -> dict:
    """The loss along ``w + alpha * d``: ``{"alpha": [...], "loss": [...], "acc": [...]}``.

    Args:
        model: the network (its current weights are ``w``).
        x, y: the data (``x`` in [0, 1], float or uint8; may stay on the CPU while the model
            is on a GPU: batches are moved one at a time).
        alphas: the coordinates.
        direction: ``{parameter name: tensor}`` (missing names: zero); default
            :func:`filter_normalized_direction` ``(model, seed)``.
        attack: ``attack(x, y) -> x_adv`` built on ``model`` (e.g. ``PGD(model, ...)``); it is
            rerun against the perturbed model at every ``alpha``. ``None``: the clean loss.
            An attack with ``bn_train=True`` is refused (it would move BN statistics).
        seed: seeds the default direction and the attack's random start; every ``alpha``
            sees the same random start (common random numbers), and the global RNG state is
            restored afterwards.
        batch_size: images per forward.
        backend: seam backend for the weight moves (default: the best available).
        callback: ``callback(index, alpha, loss, acc)`` after each ``alpha`` (progress bars).

    ``loss`` is the mean cross-entropy (accumulated in float64) and ``acc`` the accuracy, on
    ``attack(x, y)`` when an attack is given, evaluated in eval mode. Weights, buffers, modes
    and the RNG state are restored exactly afterwards, also on an exception.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_data(x, y)
    vals = _check_alphas(alphas)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if attack is not None and not callable(attack):
        raise TypeError(f"attack must be callable as attack(x, y), got {type(attack).__name__}")
    if getattr(attack, "bn_train", False):
        raise ValueError("the landscape is evaluated in eval mode, but the attack has bn_train=True (it would "
                         "update BatchNorm statistics); build it with bn_train=False")
    ref = _first_float(model)
    if ref is None:
        raise ValueError("the model has no floating-point parameters or buffers")
    device, dtype = ref.device, ref.dtype
    if direction is None:
        direction = filter_normalized_direction(model, seed=seed)
    mover = _Mover(model, direction, backend)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    out = {"alpha": [], "loss": [], "acc": []}
    try:
        with attack_mode(model, False):
            for i, a in enumerate(vals):
                mover.move(a)
                loss, acc = _evaluate(model, x, y, attack, int(batch_size), device, dtype, seed)
                out["alpha"].append(a)
                out["loss"].append(loss)
                out["acc"].append(acc)
                if callback is not None:
                    callback(i, a, loss, acc)
    finally:
        mover.restore()
        changed = 0
        with torch.no_grad():
            for b, saved in buffers:
                if not torch.equal(b, saved):  # only an attack that runs the model in train mode does this
                    b.copy_(saved)
                    changed += 1
        if changed:
            warnings.warn(f"weight_landscape: the attack changed {changed} buffer(s) of the model (BatchNorm "
                          "statistics: it ran the model in train mode); they are restored now, but the points "
                          "were evaluated with the changed statistics. Run the attack in eval mode.",
                          RuntimeWarning, stacklevel=2)
    return out


def flatness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: float,
             directions: Union[int, Direction, Sequence[Direction]], attack: Optional[Callable],
             *, seed: int = 0, batch_size: int = 256, backend: Optional[str] = None,
             details: bool = False) -> Union[float, dict]:
    """Flatness of the (adversarial) weight loss landscape at ``alpha``: a sharpness number.

    Definition::

        flatness = mean over directions d of [ g_d(alpha) - g(0) ]

    where ``g_d(alpha)`` is the mean cross-entropy of the model at ``w + alpha * d`` on
    ``attack(x, y)`` regenerated against the perturbed model (on ``x`` when ``attack`` is
    None), ``g(0)`` the same at ``w``, the model in eval mode, and each ``d`` filter-normalized
    (:func:`filter_normalized_direction`). Larger means sharper: the loss rises faster when the
    weights move by ``alpha`` filter norms. Use a fixed data subset and ``alpha`` (e.g. 0.5)
    to compare epochs or runs.

    ``directions`` is a number ``k`` (the directions drawn with seeds ``seed .. seed + k - 1``:
    the same Gaussian draws at every call, rescaled to the current filter norms, so that
    the number tracks one set of directions through training), one direction dict, or a list.
    The attack's random start is seeded with ``seed`` for every evaluation (common random
    numbers between ``g(alpha)`` and ``g(0)``). Weights, buffers, modes and the RNG state
    are restored exactly, as in :func:`weight_landscape`.

    With ``details=True`` it returns ``{"flatness": ..., "loss0": g(0), "rises": [g_d(alpha) - g(0)
    per direction]}`` instead of the number.
    """
    a = _check_alphas([alpha])[0]
    dirs = _directions(model, directions, seed)
    kw = dict(attack=attack, seed=seed, batch_size=batch_size, backend=backend)
    g0 = weight_landscape(model, x, y, [0.0], direction=dirs[0], **kw)["loss"][0]
    rises = [weight_landscape(model, x, y, [a], direction=d, **kw)["loss"][0] - g0 for d in dirs]
    value = float(sum(rises) / len(rises))
    return {"flatness": value, "loss0": float(g0), "rises": rises} if details else value


# ============================================================================ command line
CLIError = UsageError
"""The landscape CLI's user error: :class:`awpfast.errors.UsageError` (one line, exit status 2)."""


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
                raise CLIError(f"--alphas {s!r}: start and stop must be finite numbers")
            if n < 2 or hi <= lo:
                raise CLIError(f"--alphas {s!r}: need start < stop and at least 2 points, e.g. -1:1:21")
            vals = [lo + (hi - lo) * k / (n - 1) for k in range(n)]
            if n % 2 == 1 and lo == -hi:
                vals[n // 2] = 0.0  # the centre exactly, not 1e-17
            return vals
        vals = [float(t) for t in s.split(",") if t.strip()]
    except UsageError:
        raise
    except ValueError:
        raise CLIError(f"--alphas {s!r} is not a range START:STOP:POINTS (e.g. -1:1:21) nor a comma list "
                       "(e.g. -1,-0.5,0,0.5,1)") from None
    if not vals or not all(math.isfinite(v) for v in vals):
        raise CLIError(f"--alphas {s!r}: give finite numbers, e.g. -1:1:21")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m awpfast.landscape",
        description="The weight loss landscape of awpfast-train checkpoints (the AWP paper's Figure 1): "
                    "adversarial loss along filter-normalized random directions, PGD regenerated at each point.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--data-dir", default=None, help="override the checkpoints' --data-dir (CIFAR-10)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="directions and PGD random starts")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default=None, help="awpfast seam backend for the weight moves")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", required=True, help="output folder (landscape.json, landscape.png)")
    p.add_argument("--overwrite", action="store_true", help="replace existing landscape.json / landscape.png")
    p.add_argument("--no-plot", action="store_true", help="JSON only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _number(name: str, s) -> float:
    try:
        v = parse_float(s)
    except ValueError:
        raise CLIError(f"{name} {s!r} is not a number (e.g. 0.03 or 8/255)") from None
    if not (math.isfinite(v) and v >= 0):
        raise CLIError(f"{name} must be a finite number >= 0, got {s!r}")
    return v


def load_checkpoint(path: str) -> dict:
    """An awpfast-train checkpoint as a dict, or a one-line :class:`CLIError` naming what is wrong
    (:func:`awpfast.checkpoint.read_checkpoint`, plus the entries the landscape needs)."""
    ck = read_checkpoint(path, "checkpoint")
    missing = [k for k in ("num_classes", "in_channels") if k not in ck]
    if missing:
        raise CLIError(f"{path}: incomplete awpfast-train checkpoint (missing {missing})")
    return ck


def _label(ck: dict, path: str) -> str:
    a = ck["args"]
    gamma = a.get("awp_gamma") or 0
    name = f"{str(a.get('method', '?')).upper()}{'-AWP' if gamma > 0 else ''}"
    if ck.get("epoch") is not None:
        name += f" (epoch {ck['epoch']})"
    return name


def _check_args(args) -> List[float]:
    alphas = parse_alphas(args.alphas)
    if args.directions < 1:
        raise CLIError(f"--directions must be >= 1, got {args.directions}")
    if args.samples < 0:
        raise CLIError(f"--samples must be >= 0 (0: all), got {args.samples}")
    if args.attack_steps < 0:
        raise CLIError(f"--attack-steps must be >= 0 (0: the clean loss), got {args.attack_steps}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.labels is not None and len(args.labels) != len(args.checkpoints):
        raise CLIError(f"--labels has {len(args.labels)} names for {len(args.checkpoints)} checkpoints")
    return alphas


def _outputs(args) -> dict:
    paths = {"json": os.path.join(args.out, "landscape.json")}
    if not args.no_plot:
        paths["png"] = os.path.join(args.out, "landscape.png")
    check_out_dir(args.out, "--out")
    taken = [p for p in paths.values() if os.path.exists(p)]
    if taken and not args.overwrite:
        raise CLIError(f"{taken[0]} already exists; pass --overwrite to replace it or choose another --out")
    return paths


def _setting(cks, key, given, default=None):
    """One value of a run option shared by all checkpoints (or the one given on the command line)."""
    if given is not None:
        return given
    vals = {repr(c["args"].get(key, default)) for c in cks}
    if len(vals) > 1:
        raise CLIError(f"the checkpoints disagree on --{key.replace('_', '-')} ({', '.join(sorted(vals))}); "
                       f"pass --{key.replace('_', '-')} to compare them at one value")
    return cks[0]["args"].get(key, default)


def run(args) -> dict:
    """Compute the landscapes for parsed ``args`` (see :func:`build_parser`), write the outputs."""
    from .attacks import PGD
    from .data import load_dataset, training_splits
    from .models import build_model

    alphas = _check_args(args)
    paths = _outputs(args)
    device = resolve_device(args.device)
    cks = [load_checkpoint(p) for p in args.checkpoints]
    data = _setting(cks, "data", None, "digits")
    image_size = {c.get("image_size", c["args"].get("image_size")) for c in cks}
    if len(image_size) > 1:
        raise CLIError(f"the checkpoints use different image sizes ({sorted(map(str, image_size))}); "
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
        raise CLIError(str(e)) from None

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
                raise CLIError(f"{path}: the weights do not fit a {a['model']} model ({msg})") from None
            model.to(device).eval()
            if args.split == "test":
                split = ds.test
            else:  # the images this run trained on (its validation hold-out excluded)
                try:
                    split = training_splits(ds, a.get("val_samples"), a.get("train_samples"),
                                            a.get("label_noise") or 0.0)[0]
                except ValueError as e:
                    raise CLIError(f"{path}: {e}") from None
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

    def parse():
        args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
