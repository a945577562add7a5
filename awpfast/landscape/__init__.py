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

writes ``landscape.json`` and ``landscape.png`` (the checkpoints overlaid) to ``--out``
(:mod:`awpfast.landscape.command`).

Guarantees of :func:`weight_landscape` (and :func:`flatness`): the model is evaluated in eval
mode; afterwards the weights are bitwise what they were, the buffers (BatchNorm running
statistics) are untouched, every submodule's train/eval flag is restored and the global RNG
state is unchanged, also when the attack or the model raises midway. Moving to ``w + alpha*d``
is one call of the seam op :func:`awpfast.ops.add_scaled_` per ``alpha`` (``params <- backups +
alpha * d``, every backend, no per-layer Python loop). The data are evaluated in batches, so a
10k-image test set on the CPU is fine with the model on a GPU.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .._lazy import lazy_getattr
from ..attacks import attack_mode
from ..perturb import flat, flat_like

__all__ = ["filter_normalized_direction", "weight_landscape", "flatness", "parse_alphas", "main"]

# the command line (``python -m awpfast.landscape``) lives in .command; its names are importable from here
__getattr__ = lazy_getattr(__name__, dict.fromkeys(("parse_alphas", "build_parser", "load_checkpoint",
                                                    "run", "plot_landscape", "main"), ".command"))

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
