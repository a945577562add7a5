"""``awpfast-train``'s loop: the :class:`Trainer`, its setup, the LR and eps schedules, the training
and evaluation epochs, the flatness probe, saving, and :func:`run`.

Reads a validated :class:`~awpfast.train.config.RunConfig` (by attribute); never parses a command line.

The training step is the reference recipe (Wu et al. 2020) without its proxy model::

    x_adv = attack(x, y)                                   # eval-mode PGD, input gradients only
    model.train()
    with awp.perturbed(lambda: loss_fn(model, x, x_adv, y)):   # w <- w + v (BN stats frozen)
        loss = loss_fn(model, x, x_adv, y); loss.backward()
        awp.step()                                         # SGD step at w + v, then w -= v
    scheduler.step()                                       # piecewise LR, per iteration
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..attacks import PGD, TRADESAttack
from ..checkpoint import (CKPT_FORMAT, LOCK_FILE, RUN_FILES, atomic_save, full_state_dicts, load_optimizer,
                          remove_stale_tmp, repair_best, rng_state, run_files, run_lock, set_rng_state)
from ..data import Batches, load_dataset, training_splits
from ..distributed import dist_sum
from ..cli import atomic_write_text
from ..errors import UsageError, check_interrupted
from ..evaluate import autocast, evaluate_split
from ..extra_data import MixedBatches, open_extra
from ..losses import get_loss
from ..models import build_model
from ..rules import AWP, RWP
from .config import RunConfig, make_config, recheck, recipe_overrides
from .report import done_line, epoch_line, note, repair_outputs, start_line, write_outputs

__all__ = ["Trainer", "setup", "run", "train_step", "train_epoch", "evaluate_epoch", "flatness_epoch",
           "save_checkpoint", "prepare_out", "lr_factor", "eps_ramp", "epoch_gamma", "set_train_eps",
           "full_eval_due", "make_attack", "FLATNESS_SEED"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}  # --dtype (choices.DTYPE_NAMES)
FLATNESS_SEED = 0             # the directions and PGD starts of --track-flatness (the same every epoch)


# ----------------------------------------------------------------------------- schedules and pieces
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


def make_attack(model, o, steps: int, train: bool, awp=None):
    """The training (TRADES KL or PGD) or evaluation (PGD) attack of a run; ``awp``: the training
    attack also sources the AWP direction (``--awp-ascent attack``)."""
    kw = dict(eps=o.attack.eps, alpha=o.attack.alpha, steps=steps, random_start=True, norm=o.attack.norm,
              bn_train=(train and o.attack.bn == "train"), backend=o.method.backend, awp=awp)
    if train and o.method.method == "trades":
        return TRADESAttack(model, l2_order=o.attack.trades_l2_order, **kw)
    return PGD(model, **kw)


# ----------------------------------------------------------------------------- phases
@dataclass
class Trainer:
    """The live objects of a run (built by :func:`setup`)."""
    cfg: RunConfig
    ds: object
    train_split: object
    val_split: object
    model: torch.nn.Module          # the plain module (what checkpoints hold)
    fwd: torch.nn.Module            # the training forward (maybe compiled)
    eval_fwd: torch.nn.Module       # attacks and evaluation (never a DDP wrapper)
    awp: object                     # the rule's wrapper: awpfast.AWP, or awpfast.RWP (--awp-rule rwp)
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
    cosines: list = field(default_factory=list)  # --awp-cosine-every: this epoch's per-layer cosines

    def record_cosines(self, c: torch.Tensor) -> None:
        self.cosines.append(c.tolist())

    def say(self, *a) -> None:
        if self.cfg.dist.is_main and not self.cfg.options.run.quiet:
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
    from ..models.preactresnet import PreActBlock
    from ..models.wideresnet import BasicBlock
    units = [m for m in model.modules() if isinstance(m, (PreActBlock, BasicBlock))]
    if not units and hasattr(model, "features"):
        units = [m for m in model.features if any(True for _ in m.parameters())]
    return units


def setup(cfg: RunConfig) -> Trainer:
    """Data, model, optimizer with its rule, schedule, attack and loader, built in this order (each
    builder below takes what the ones before it made); then the ``--resume`` state. Writes nothing."""
    o, dist = cfg.options, cfg.dist
    if o.run.threads:
        torch.set_num_threads(o.run.threads)
    seed = o.run.seed + dist.rank  # different attack random starts per process; the loader is shared
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    ds = load_dataset(o.data.data, o.data.dir, o.data.image_size)
    train, val = training_splits(ds, o.data.val_samples, o.data.train_samples, o.data.label_noise)
    model, fwd, eval_fwd, target = build_models(cfg, ds)
    awp = build_rule(cfg, model, target)
    batches = build_batches(cfg, ds, train)
    n_iter, epochs = len(batches), o.optim.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(awp, lambda k: lr_factor(o.optim.lr_schedule, (k + 1) / n_iter, epochs))
    scaler = torch.amp.GradScaler(cfg.device.type) if o.optim.amp == "fp16" else None
    t = Trainer(cfg=cfg, ds=ds, train_split=train, val_split=val, model=model, fwd=fwd,
                eval_fwd=eval_fwd, awp=awp, sched=sched, scaler=scaler,
                loss_fn=get_loss(o.method.method, o.method.beta, o.method.forward_order),
                ascent_loss_fn=get_loss(o.method.method, o.method.beta),
                attack=make_attack(eval_fwd, o, o.attack.steps, train=True,
                                   awp=awp if o.method.awp_ascent == "attack" else None),
                batches=batches, n_iter=n_iter,
                dtype=DTYPES[o.optim.dtype], best={"epoch": None, "selected_on": "val" if len(val) else "test"})
    if cfg.checkpoint is not None:
        load_state(t, seed)
    return t


def build_models(cfg: RunConfig, ds) -> tuple:
    """``(model, fwd, eval_fwd, target)``: the plain module (with the ``--resume`` weights), the training
    forward (compiled, DDP / FSDP-wrapped), the forward of attacks and evaluation (never a DDP wrapper)
    and the module the rule perturbs (the wrapped one under torchrun, which the rule detects)."""
    o, dist = cfg.options, cfg.dist
    model = build_model(o.data.model, ds.num_classes, ds.in_channels, o.data.width, o.data.input_norm)
    model = model.to(cfg.device, DTYPES[o.optim.dtype])
    if cfg.checkpoint is not None:
        try:
            model.load_state_dict(cfg.checkpoint["model"])
        except RuntimeError as e:
            raise UsageError(f"--resume {cfg.resume_path}: the weights do not fit {o.data.model} "
                             f"({str(e).splitlines()[0]})") from None
    if o.optim.channels_last:
        model = model.to(memory_format=torch.channels_last)
    inner = torch.compile(model) if o.optim.compile else model
    wrapped = _wrap(inner, cfg)
    eval_fwd = wrapped if dist.mode == "fsdp" else inner  # FSDP: every forward goes through the sharded module
    return model, wrapped, eval_fwd, (wrapped if dist.enabled else model)


def build_rule(cfg: RunConfig, model: torch.nn.Module, target: torch.nn.Module):
    """The base SGD wrapped in the run's weight-perturbation rule (``awpfast.AWP``, or ``awpfast.RWP``)."""
    o = cfg.options
    base = torch.optim.SGD(model.parameters(), lr=o.optim.lr, momentum=o.optim.momentum,
                           weight_decay=o.optim.weight_decay,
                           nesterov=o.optim.nesterov)
    if o.method.awp_rule == "rwp":
        return RWP(base, target, gamma=o.method.awp_gamma, steps=o.method.rwp_steps, lr=o.method.rwp_lr,
                   loss_threshold=o.method.rwp_threshold, restore=o.method.awp_restore, backend=o.method.backend)
    return AWP(base, target, gamma=o.method.awp_gamma, steps=o.method.awp_steps, restore=o.method.awp_restore,
               backend=o.method.backend, ascent_every=o.method.awp_every, ascent_fraction=o.method.awp_ascent_fraction,
               ascent_seed=o.run.seed, ascent="momentum" if o.method.awp_ascent == "momentum" else "gradient")


def build_batches(cfg: RunConfig, ds, train):
    """The training loader: this process's share of each batch, with ``--extra-data`` mixed in when given."""
    o, dist = cfg.options, cfg.dist
    augment = ds.augment if o.data.augment == "auto" else o.data.augment
    common = dict(augment=augment, seed=o.run.seed, device=cfg.device, pad_mode=o.data.pad_mode, rank=dist.rank,
                  world_size=dist.world_size)
    if o.data.extra_data:  # a fixed share of every batch from the extra set (the base split alone otherwise)
        extra = open_extra(o.data.extra_data, ds.num_classes, ds.image_size, ds.in_channels)
        return MixedBatches(train, extra, o.optim.batch_size, o.data.extra_fraction, o.data.steps_per_epoch, **common)
    return Batches(train, o.optim.batch_size, shuffle=True, drop_last=False, **common)


def load_state(t: Trainer, seed: int) -> None:
    """The ``--resume`` checkpoint's optimizer, schedule, scaler, RNG and history into ``t``."""
    cfg, ckpt, dist = t.cfg, t.cfg.checkpoint, t.cfg.dist
    load_optimizer(t.awp, t.model, ckpt["optimizer"], dist.mode == "fsdp")
    t.sched.load_state_dict(ckpt["scheduler"])
    if t.scaler is not None and ckpt.get("scaler"):
        t.scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"]
    per_rank = ckpt.get("rng_ranks")
    if dist.enabled and per_rank and len(per_rank) == dist.world_size:
        rng = per_rank[dist.rank]
    elif dist.rank > 0:  # another world size: continue the data order, fresh attack noise per process
        rng = dict(rng, torch=torch.manual_seed(seed + 7919 * int(ckpt["epoch"])).get_state())
    set_rng_state(rng, t.batches.generator)
    if "extra_loader" in rng:  # the extra-data sampler's own generator
        t.batches.load_state_dict(rng["extra_loader"])
    t.start, t.history, t.best = int(ckpt["epoch"]), list(ckpt["history"]), dict(ckpt["best"])
    t.best.setdefault("selected_on", "test")


def prepare_out(t: Trainer) -> None:
    """Create ``--out`` (rank 0), drop a replaced run's files (``--overwrite``) and record the options."""
    cfg = t.cfg
    if not cfg.dist.is_main:
        return
    out = cfg.options.run.out
    os.makedirs(out, exist_ok=True)
    if cfg.options.run.overwrite and cfg.checkpoint is None:
        for f in RUN_FILES:
            p = os.path.join(out, f)
            if os.path.isfile(p):
                os.remove(p)
    rec = {k: v for k, v in vars(cfg.args).items()}
    rec["world_size"] = cfg.dist.world_size
    rec["run_id"] = cfg.run_id
    if cfg.options.method.recipe:  # the options given explicitly that moved the run away from its recipe
        rec["recipe_overrides"] = recipe_overrides(cfg.args)
    atomic_write_text(os.path.join(out, "args.json"), json.dumps(rec, indent=1, sort_keys=True))


def epoch_gamma(o, epoch: int) -> float:
    """The AWP gamma of 0-based ``epoch``: 0 during the first ``awp_warmup`` epochs."""
    return o.method.awp_gamma if epoch >= o.method.awp_warmup else 0.0


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
    o = t.cfg.options
    f = eps_ramp(o.attack.eps_warmup, epoch + (i + 1) / t.n_iter)
    t.attack.eps, t.attack.alpha = o.attack.eps * f, o.attack.alpha * f
    return t.attack.eps


def train_step(t: Trainer, x: torch.Tensor, y: torch.Tensor):
    """One training step on the batch ``(x, y)``: attack, AWP ascent, descent at ``w + v``, restore,
    LR schedule; returns ``(loss, logits_adv)`` of the descent pass at ``w + v``.

    With ``--forward-order reference`` BatchNorm is fed as in the reference scripts: AT runs,
    after a train-mode attack, the extra loss forward on ``x_adv`` that the reference attack makes
    to keep its best restart, and after the restore a clean train-mode forward (the reference logs
    its accuracy); TRADES runs its forwards at ``w + v`` adversarial, clean, clean (see
    :class:`awpfast.losses.TRADESLoss`). These extra forwards run without gradient."""
    o, device = t.cfg.options, t.cfg.device
    reference_at = o.method.forward_order == "reference" and o.method.method == "at"
    if x.dtype != t.dtype:
        x = x.to(t.dtype)
    if o.optim.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, o.optim.amp):
        x_adv = t.attack(x, y)
    t.model.train()
    if reference_at and o.attack.bn == "train":
        with torch.no_grad(), autocast(device, o.optim.amp):
            t.eval_fwd(x_adv)
    scale = t.scaler.get_scale() if t.scaler is not None else 1.0

    def closure(pick=None):
        with autocast(device, o.optim.amp):
            if o.method.awp_rule == "rwp":  # RWP masks the per-example adversarial losses itself
                return F.cross_entropy(t.fwd(x_adv), y, reduction="none")
            if pick is None:
                return t.ascent_loss_fn(t.fwd, x, x_adv, y) * scale
            return t.ascent_loss_fn(t.fwd, *pick(x, x_adv, y)) * scale  # --awp-ascent-fraction: a sub-batch

    exact = _exact_direction(t, x, x_adv, y)  # --awp-cosine-every: on the side, before the perturbation
    # --awp-ascent attack: the attack left the direction pending (none at gamma 0 or on a re-use step);
    # --awp-ascent momentum: the direction is SGD's momentum buffer
    with t.awp.perturbed(closure if o.method.awp_ascent == "separate" else None):
        if exact is not None and t.awp.is_perturbed:
            t.record_cosines(t.awp.direction_cosines(exact))
        t.awp.zero_grad(set_to_none=True)
        with autocast(device, o.optim.amp):
            loss, logits_adv = t.loss_fn(t.fwd, x, x_adv, y, return_logits=True)
        if t.scaler is not None:
            t.scaler.scale(loss).backward()
            t.scaler.step(t.awp)
            t.scaler.update()
        else:
            loss.backward()
            t.awp.step()
    if reference_at and o.method.awp_rule == "awp":  # the AWP script's clean forward (RWP's script has none)
        with torch.no_grad(), autocast(device, o.optim.amp):
            t.eval_fwd(x)
    t.sched.step()
    return loss, logits_adv


def _exact_direction(t: Trainer, x, x_adv, y):
    """``--awp-cosine-every N``: on every N-th step (the scheduler's step count) with AWP on, the exact
    AWP direction at the current weights (the separate train-mode ascent on the full batch), or None.
    Computed on the side: BatchNorm statistics, ``.grad``, the RNG streams and the trajectory are
    untouched."""
    every = t.cfg.options.method.awp_cosine_every
    if not every or t.sched.last_epoch % every or not any(g.get("awp_gamma") for g in t.awp.param_groups):
        return None
    o, device = t.cfg.options, t.cfg.device
    with autocast(device, o.optim.amp):
        return t.awp.ascent_direction(lambda *_: t.ascent_loss_fn(t.fwd, x, x_adv, y))


def train_epoch(t: Trainer, epoch: int) -> dict:
    """One pass of adversarial training with AWP (:func:`train_step` per batch); returns loss /
    accuracy / timing (global under torchrun)."""
    o, device = t.cfg.options, t.cfg.device
    t.awp.set_gamma(epoch_gamma(o, epoch))
    t.model.train()
    t0 = time.perf_counter()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss * n, correct: no host sync per step
    n_local = 0
    bar = None
    if t.cfg.dist.is_main and not (o.run.no_progress or o.run.quiet) and sys.stderr.isatty():
        try:
            from tqdm import tqdm
            bar = tqdm(total=t.n_iter, desc=f"epoch {epoch + 1}/{o.optim.epochs}", leave=False, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    eps_now, ramp = o.attack.eps, o.attack.eps_warmup
    for i, (x, y) in enumerate(t.batches):
        if ramp:
            eps_now = set_train_eps(t, epoch, i)
        loss, logits_adv = train_step(t, x, y)
        check_interrupted()  # a Ctrl-C / SIGTERM that landed where Python swallows exceptions
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
    loss_sum, ok, n = dist_sum(sums.tolist() + [float(n_local)], device, t.cfg.dist.world_size)
    train_time = time.perf_counter() - t0
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}; lower --lr or drop --amp fp16 "
                                 f"(last.pt still holds epoch {epoch})")
    rec = {"train_loss": loss_sum / n, "train_adv_acc": ok / n, "train_time_s": train_time,
           "img_per_s": n / max(train_time, 1e-9)}
    if ramp:
        rec["train_eps"] = eps_now  # the radius of the epoch's last step
    if o.method.awp_cosine_every:
        rec.update(_cosine_record(t.cosines))
        t.cosines = []
    return rec


def _cosine_record(rows: list) -> dict:
    """The epoch's ``--awp-cosine-every`` samples: per-layer mean cosine, their mean, the sample count."""
    if not rows:
        return {"awp_cosine": None, "awp_cosine_mean": None, "awp_cosine_samples": 0}
    per_layer = [sum(c) / len(c) for c in zip(*rows)]
    finite = [v for v in per_layer if math.isfinite(v)]
    return {"awp_cosine": per_layer, "awp_cosine_mean": sum(finite) / len(finite) if finite else None,
            "awp_cosine_samples": len(rows)}


def full_eval_due(o, epoch: int) -> bool:
    """Whether 0-based ``epoch`` evaluates the test split and the training subset on the
    ``--eval-every`` schedule (every K-th epoch and the last one)."""
    every = o.attack.eval_every or 1
    return (epoch + 1) % every == 0 or epoch + 1 == o.optim.epochs


def evaluate_epoch(t: Trainer, epoch: Optional[int] = None) -> dict:
    """Clean and PGD accuracy on the validation split, the test split and a training subset (and the
    flatness with ``--track-flatness``) after 0-based ``epoch`` (default: the next one in the history).
    With ``--eval-every K`` the test split and the training subset are evaluated on that schedule and
    whenever the validation PGD accuracy beats the best so far; otherwise their entries are ``None``."""
    o, cfg = t.cfg.options, t.cfg
    epoch = len(t.history) if epoch is None else epoch
    t1 = time.perf_counter()
    if cfg.dist.enabled:
        import torch.distributed as dist
        for b in t.model.buffers():  # evaluate (and save) rank 0's BatchNorm statistics everywhere
            dist.broadcast(b, 0)
    ev = dict(batch_size=max(o.optim.batch_size // cfg.dist.world_size, 128), eps=o.attack.eps, alpha=o.attack.alpha,
              steps=o.attack.eval_steps, norm=o.attack.norm, device=cfg.device, amp=o.optim.amp,
              channels_last=o.optim.channels_last, backend=o.method.backend, rank=cfg.dist.rank,
              world_size=cfg.dist.world_size)
    rec = {}
    va = evaluate_split(t.eval_fwd, t.val_split, **ev) if len(t.val_split) else None
    scheduled = full_eval_due(o, epoch)
    best_val = t.best.get("val_robust_acc") if t.best else None
    full = scheduled or (va is not None and (best_val is None or va["robust_acc"] > best_val))
    te = evaluate_split(t.eval_fwd, t.ds.test, limit=o.attack.eval_samples, **ev) if full else None
    tr = evaluate_split(t.eval_fwd, t.train_split, limit=o.attack.train_eval_samples, **ev) \
        if (o.attack.train_eval_samples and full) else None
    rec["val_clean_acc"] = va["clean_acc"] if va else None
    rec["val_robust_acc"] = va["robust_acc"] if va else None
    rec["train_clean_acc"] = tr["clean_acc"] if tr else None
    rec["train_robust_acc"] = tr["robust_acc"] if tr else None
    rec.update({k: (te[v] if te else None) for k, v in (("test_clean_acc", "clean_acc"),
                                                        ("test_robust_acc", "robust_acc"),
                                                        ("test_clean_loss", "clean_loss"),
                                                        ("test_robust_loss", "robust_loss"))})
    rec["eval_time_s"] = time.perf_counter() - t1
    if o.flatness.track_flatness and scheduled:
        rec.update(flatness_epoch(t))
    return rec


def flatness_epoch(t: Trainer) -> dict:
    """``--track-flatness``: the flatness of the adversarial weight loss landscape at the current weights.

    ``flatness = mean over d of [L(w + alpha d) - L(w)]``: ``L`` the mean cross-entropy on PGD
    examples (``--flatness-steps`` steps, the run's ``--eps`` / ``--alpha`` / ``--norm``; regenerated
    against the perturbed weights) of the first ``--flatness-samples`` images of ``--flatness-split``
    (``val``, the default: the held-out validation split, whose labels are never noised; ``train``:
    the first training images, ``--label-noise`` labels included), eval mode;
    ``d`` the ``--flatness-directions`` filter-normalized directions of :func:`awpfast.landscape.flatness`
    drawn with fixed seeds (the same Gaussian draws every epoch, rescaled to the current filter norms);
    ``alpha`` = ``--flatness-alpha``. Weights, buffers, modes and RNG states are restored bitwise, so
    the training trajectory does not change. Under torchrun (DDP) rank 0 computes it on its replica and
    broadcasts the numbers: every process records the same values. Returns ``{"flatness",
    "flatness_loss0", "flatness_time_s"}``."""
    from ..landscape import flatness
    o, cfg = t.cfg.options, t.cfg
    t0 = time.perf_counter()
    vals = torch.zeros(2, dtype=torch.float64)
    if cfg.dist.is_main:
        split = t.train_split if o.flatness.split == "train" else t.val_split
        sub = split.subset(o.flatness.samples)
        attack = PGD(t.model, eps=o.attack.eps, alpha=o.attack.alpha, steps=o.flatness.steps, norm=o.attack.norm,
                     random_start=True, backend=o.method.backend) if o.flatness.steps > 0 else None
        res = flatness(t.model, sub.x, sub.y, o.flatness.alpha, o.flatness.directions, attack,
                       seed=FLATNESS_SEED, batch_size=max(o.optim.batch_size // cfg.dist.world_size, 128),
                       backend=o.method.backend, details=True)
        vals = torch.tensor([res["flatness"], res["loss0"]], dtype=torch.float64)
    if cfg.dist.enabled:
        import torch.distributed as dist
        buf = vals.to(cfg.device)
        dist.broadcast(buf, 0)
        vals = buf.cpu()
    return {"flatness": float(vals[0]), "flatness_loss0": float(vals[1]),
            "flatness_time_s": time.perf_counter() - t0}


def save_checkpoint(t: Trainer, epoch: int, is_best: bool) -> None:
    """``last.pt`` (and ``best.pt``), ``metrics.jsonl`` and the plot; written by rank 0 only.

    ``last.pt`` is the commit point and is written first, each file atomically (``.tmp`` + rename).
    Whatever instant a kill hits, ``last.pt`` is a complete epoch, and the epoch it records as best is
    in ``best.pt`` or, when the kill fell between the two writes of a new best epoch, ``last.pt``'s
    own epoch (``best.pt`` is then that very state); ``metrics.jsonl`` and the plot are a function
    of ``last.pt``'s history. ``--resume`` (:func:`repair`) restores all of that, also for a
    finished run."""
    cfg, o = t.cfg, t.cfg.options
    rng = rng_state(t.batches.generator)
    if isinstance(t.batches, MixedBatches):
        rng["extra_loader"] = t.batches.state_dict()
    rng_ranks = None
    if cfg.dist.enabled:
        import torch.distributed as dist
        rng_ranks = [None] * cfg.dist.world_size
        dist.all_gather_object(rng_ranks, rng)
    model_sd, optim_sd = full_state_dicts(t.model, t.awp, cfg.dist.mode == "fsdp", cfg.dist.is_main)  # collective
    if not cfg.dist.is_main:
        return
    state = {"format": CKPT_FORMAT, "run_id": cfg.run_id, "epoch": epoch + 1, "model": model_sd,
             "optimizer": optim_sd, "scheduler": t.sched.state_dict(),
             "scaler": t.scaler.state_dict() if t.scaler is not None else None,
             "rng": rng, "rng_ranks": rng_ranks, "world_size": cfg.dist.world_size,
             "history": t.history, "best": t.best, "args": vars(cfg.args),
             "num_classes": t.ds.num_classes, "in_channels": t.ds.in_channels, "image_size": t.ds.image_size}
    atomic_save(state, os.path.join(o.run.out, "last.pt"))
    if is_best:
        atomic_save(state, os.path.join(o.run.out, "best.pt"))
    write_outputs(t.history, cfg.args)


def run(args) -> dict:
    """Train with parsed ``args`` (``awpfast.train.build_parser``) or a :class:`RunConfig`; returns the summary."""
    cfg = args if isinstance(args, RunConfig) else make_config(args, getattr(args, "_explicit", None))
    o = cfg.options
    if cfg.dist.is_main:
        for n in cfg.notes:
            note(n)
    created = _missing_dirs(o.run.out)  # the folders this run creates (removed again if it writes nothing)
    try:
        # one run per folder: rank 0 (the one that writes) holds the folder's lock for the whole run,
        # and repeats under it the checks another process could have changed since make_config
        with run_lock(o.run.out) if cfg.dist.is_main else contextlib.nullcontext():
            if cfg.dist.is_main:
                recheck(cfg)
            if cfg.finished:
                return _finish_resume(cfg)
            _init_distributed(cfg)
            t = setup(cfg)
            prepare_out(t)
            return _train_loop(t)
    except BaseException:
        # a run that failed before writing anything leaves no empty folder behind
        if cfg.dist.is_main and created and os.path.isdir(o.run.out) and not run_files(o.run.out):
            for f in ("args.json", LOCK_FILE):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(o.run.out, f))
            for d in created:  # innermost first
                with contextlib.suppress(OSError):
                    os.rmdir(d)
        raise


def _missing_dirs(path: str) -> list:
    """``path`` and its parents that do not exist yet, innermost first."""
    out, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        out.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return out


def repair(cfg: RunConfig) -> list:
    """Bring a resumed run's folder in line with its ``last.pt`` (the commit point; rank 0): stale
    ``*.tmp`` files of an interrupted write removed, ``best.pt`` holding the epoch ``last.pt`` records
    as best, ``metrics.jsonl`` and the plot rebuilt from ``last.pt``'s history. Returns what it did."""
    if not cfg.dist.is_main or cfg.checkpoint is None:
        return []
    o = cfg.options
    done = [f"removed {f} (an interrupted write)" for f in remove_stale_tmp(o.run.out)]
    fixed = repair_best(o.run.out, cfg.checkpoint, cfg.resume_path)
    if fixed:
        done.append(fixed)
    return done + repair_outputs(list(cfg.checkpoint["history"]), cfg.args)


def _finish_resume(cfg: RunConfig) -> dict:
    """``--resume`` of a run that trained all its epochs: repair its files if a kill left them
    disagreeing (exit 0, saying what), else refuse (nothing to resume)."""
    o, ck = cfg.options, cfg.checkpoint
    done = repair(cfg)
    if not done:
        raise UsageError(f"nothing to resume: the run in {o.run.out} already finished {int(ck['epoch'])} of "
                         f"{o.optim.epochs} epochs; pass --epochs N (> {int(ck['epoch'])}) to train longer")
    for d in done:
        note(f"--resume: repaired: {d}")
    history = list(ck["history"])
    return {"out": o.run.out, "epochs_done": len(history), "best": dict(ck["best"]),
            "last": history[-1] if history else None, "repaired": done}


def _train_loop(t: Trainer) -> dict:
    cfg, o = t.cfg, t.cfg.options
    if cfg.checkpoint is not None:
        for d in repair(cfg):
            note(f"--resume: repaired: {d}")
        t.say(f"resumed from epoch {t.start} ({cfg.resume_path})")
    ds = t.ds
    t.say(start_line(cfg.args, t.train_split, t.val_split, ds, cfg))
    sel = "val_robust_acc" if len(t.val_split) else "test_robust_acc"
    stop_at = o.optim.epochs if o.run.stop_after is None else min(o.optim.epochs, t.start + o.run.stop_after)
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
        t.say(epoch_line(rec, cfg.args, is_best))
        check_interrupted()
    history, best = t.history, t.best
    summary = {"out": o.run.out, "epochs_done": len(history), "best": best, "last": history[-1] if history else None}
    if history:
        last = history[-1]
        t.say(done_line(best, last, cfg.args))
    return summary
