"""``awpfast-train``'s configuration: recipes, the parser, **one defaults table** that the parser,
the resolution of the options and their validation all read, and the validated :class:`RunConfig`
that the loop reads by attribute.

Nothing here runs a training step or writes a file; :func:`make_config` reads at most the
``--resume`` checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
from dataclasses import dataclass, field, make_dataclass
from typing import TYPE_CHECKING, Callable, List, Optional

from ..choices import (BACKENDS, DATASETS, DTYPE_NAMES, FORWARD_ORDERS, INPUT_NORM_NAMES, L2_ORDERS, METHODS,
                       MODEL_NAMES, PAD_MODES)
from ..cli import ArgumentParser, HelpFormatter, check_out_dir, parse_float, resolve_device
from ..errors import UsageError
from .recipes import RECIPES, apply_recipe, recipe_overrides
from .measured import measured

# torch-free at import: parsing and validating a command line (:func:`preflight`) needs no torch; the
# checkpoint reader and the launch environment are imported by make_config when it needs them
if TYPE_CHECKING:  # pragma: no cover
    import torch
    from ..distributed import DistInfo

__all__ = ["DEFAULTS", "Derived", "OPTIONS", "Options", "RECIPES", "RunConfig", "apply_recipe", "build_parser",
           "make_config", "preflight",
           "recipe_overrides", "resolve_defaults", "validate_args", "LR_SCHEDULES", "DESCRIPTION"]

DESCRIPTION = "Adversarial training with AWP: ``python -m awpfast.train`` / ``awpfast-train``."
MODELS = MODEL_NAMES
DEFAULT_GAMMA = {"at": 0.01, "mart": 0.01, "trades": 0.005}
DEFAULT_WARMUP = {"at": 0, "mart": 0, "trades": 10}
DEFAULT_VAL = {"cifar10": 1000, "digits": 100, "synthetic": 100}
EXTRA_FRACTION = 0.5  # RST's unsup_fraction (awpfast.extra_data.DEFAULT_FRACTION)
LR_SCHEDULES = ("piecewise", "piecewise-epoch", "cosine", "constant")
FLATNESS_SPLITS = ("val", "train")
AWP_ASCENTS = ("separate", "attack", "momentum")
AWP_RULES = ("awp", "rwp")


# ----------------------------------------------------------------------------- the option table
@dataclass(frozen=True)
class Derived:
    """A default that depends on other options: the parser shows ``unset`` (``None`` or ``"auto"``),
    :func:`resolve_defaults` replaces it by ``fn(args)`` in the table's order."""
    fn: Callable
    unset: object = None


def _opt(key: str) -> str:
    return "--" + key.replace("_", "-")


@dataclass(frozen=True)
class Int:
    """An integer option's check: ``>= lo`` (and ``< below``); ``optional``: ``None`` (unset) allowed,
    said in the message unless ``plain``."""
    lo: int
    optional: bool = False
    below: Optional[int] = None
    plain: bool = False

    def __call__(self, args, key: str) -> None:
        v = getattr(args, key)
        if v is None and self.optional:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < self.lo:
            what = " (or leave it out)" if self.optional and not self.plain else ""
            raise UsageError(f"{_opt(key)} must be an integer >= {self.lo}{what}, got {v!r}")
        if self.below is not None and v >= self.below:
            raise UsageError(f"{_opt(key)} must be < {'2**32' if self.below == 2 ** 32 else self.below}, got {v}")


@dataclass(frozen=True)
class Float:
    """A number option's check (and conversion to ``float``): finite, ``> lo`` (``strict``) or ``>= lo``,
    ``<= hi``; ``what`` ends the message."""
    lo: float
    strict: bool = False
    hi: Optional[float] = None
    what: str = ""

    def __call__(self, args, key: str) -> None:
        _need_float(args, key, self.lo, self.strict, self.hi, self.what)


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


def _known_backend(args, key: str) -> None:
    if args.backend is not None and args.backend not in BACKENDS:
        raise UsageError(f"--backend {args.backend!r} is unknown: choose one of {', '.join(BACKENDS)}")


def _eps(args, key: str) -> None:
    _need_float(args, key, 0, hi=1.0 if args.norm == "Linf" else None, what=" (inputs live in [0, 1])")


def _rwp(a) -> bool:
    return a.awp_rule == "rwp"


def _flatness(a) -> bool:
    return bool(a.track_flatness)


@dataclass(frozen=True)
class Option:
    """One ``awpfast-train`` option, written once: its parser entry (``group``, ``kw``: ``add_argument``'s
    keywords), its default (a value or a :class:`Derived`), whether it defines the run (``run``: taken
    from the checkpoint on ``--resume`` and part of the default ``--out`` hash) and its value check
    (``check(args, dest)``, when ``when(args)``; a ``choices`` entry is checked too)."""
    dest: str
    group: str
    default: object
    kw: dict
    run: bool = True
    check: Optional[Callable] = None
    when: Optional[Callable] = None
    exclusive: bool = False  # in the group's mutually exclusive pair (--ddp / --fsdp)

    @property
    def unset(self):
        """What the parser stores when the option is not given."""
        return self.default.unset if isinstance(self.default, Derived) else self.default

    def validate(self, args) -> None:
        if self.when is not None and not self.when(args):
            return
        if self.check is not None:
            self.check(args, self.dest)
        choices = self.kw.get("choices")
        v = getattr(args, self.dest)
        if choices is not None and v not in choices and not (v is None and self.unset is None):
            raise UsageError(f"{_opt(self.dest)} must be one of {', '.join(choices)}, got {v!r}")


def opt(dest: str, group: str, default, *, run: bool = True, check=None, when=None, exclusive: bool = False,
        **kw) -> Option:
    return Option(dest, group, default, kw, run, check, when, exclusive)


def _default_out(a) -> str:
    """``runs/<method>[-awp]-<model>-<data>-s<seed>-<hash>``: the hash covers every option that defines
    the run (``_RUN_KEYS`` and ``--epochs``), so two runs that differ in any of them (lr, eps, ...)
    never share a default folder."""
    import hashlib
    key = repr(sorted((k, repr(getattr(a, k, None))) for k in _RUN_KEYS + ("epochs",) if k != "seed"))
    tag = hashlib.sha256(key.encode()).hexdigest()[:8]
    awp = "-awp" if isinstance(a.awp_gamma, (int, float)) and a.awp_gamma > 0 else ""  # checked later
    return os.path.join("runs", f"{a.method}{awp}-{a.model}-{a.data}-s{a.seed}-{tag}")


OPTIONS = (
    opt("recipe", "method", None,
        choices=tuple(RECIPES),
        help="preset: the options of a reference script (the AT-AWP / TRADES-AWP code of Wu et al., "
             "or its AT / TRADES without AWP); options given explicitly override it, args.json records "
             "the resolved values (see docs/recipes.md) (default: none, i.e. our own settings)"),
    opt("method", "method", "at",
        choices=METHODS,
        help="AT (Madry), TRADES or MART"),
    opt("beta", "method", 6.0, check=Float(0),
        type=float,
        help="TRADES / MART trade-off"),
    opt("awp_gamma", "method", Derived(lambda a: DEFAULT_GAMMA.get(a.method)),
        check=Float(0, hi=1.0, what=" (0 disables AWP; above 1 the perturbation swamps the weights)"),
        type=float,
        help="AWP relative size ||v||/||w||; 0 disables AWP (default: 0.01 for at/mart, 0.005 for trades)"),
    opt("awp_warmup", "method", Derived(lambda a: DEFAULT_WARMUP.get(a.method)), check=Int(0),
        type=int,
        help="epochs without AWP at the start (default: 0 for at/mart, 10 for trades)"),
    opt("awp_steps", "method", 1, check=Int(1),
        type=int,
        help="AWP ascent steps"),
    opt("awp_restore", "method", "after_step",
        choices=("after_step", "before_step"),
        help="after_step: step at w+v then subtract v (the reference); before_step: restore w exactly, "
             "then step"),
    opt("awp_ascent", "method", "separate",
        choices=AWP_ASCENTS,
        help="where the AWP direction comes from: separate (a train-mode ascent pass on x_adv, the "
             "reference), attack (the training attack's last step also returns the weight gradient at "
             "its last iterate; measured: " + measured("attack") + "; with --attack-bn eval: "
             + measured("attack-evalbn") + ") or momentum (SGD's momentum buffer re-scaled per layer: no "
             "extra pass, not an approximation of AWP's direction; measured: " + measured("momentum")
             + "). The study: docs/reproduction.md"),
    opt("awp_ascent_fraction", "method", 1.0, check=Float(0, strict=True, hi=1.0, what=" (the share of the batch)"),
        type=parse_float,
        metavar="F",
        help="the separate ascent pass on a random F of each batch (rows drawn from the wrapper's own "
             "seeded stream, resumable); 1: the whole batch. Measured at F = 0.25: " + measured("sub0.25")
             + " (docs/reproduction.md)"),
    opt("awp_rule", "method", "awp",
        choices=AWP_RULES,
        help="the weight adversary: awp (Wu et al. 2020, per-layer) or rwp (Robust Weight Perturbation, "
             "Yu et al. 2022: --rwp-steps ascent passes on the examples whose loss is below "
             "--rwp-threshold, one global norm; --awp-gamma and --awp-warmup apply to both; --method at "
             "only). Measured with the reference's settings: " + measured("rwp") + " (docs/reproduction.md)"),
    opt("rwp_steps", "method", 10, check=Int(1), when=_rwp,
        type=int,
        help="RWP's ascent passes per step (the reference: 10)"),
    opt("rwp_lr", "method", 0.01, check=Float(0, strict=True), when=_rwp,
        type=parse_float,
        help="RWP's ascent step size (the reference's proxy lr)"),
    opt("rwp_threshold", "method", 1.7, check=Float(0), when=_rwp,
        type=parse_float,
        help="RWP's Loss Stationary Condition: only examples whose adversarial loss is below it drive "
             "the perturbation"),
    opt("awp_cosine_every", "method", 0, check=Int(0),
        type=int,
        metavar="N",
        help="every N steps, also compute the exact AWP direction on the side and log the per-layer "
             "cosine of the applied perturbation to it (metrics.jsonl 'awp_cosine'); the trajectory is "
             "unchanged; 0: off"),
    opt("awp_every", "method", 1, check=Int(1),
        type=int,
        help="compute the AWP direction every K steps and re-use it (re-scaled to the weights) in "
             "between (1: every step). Measured at K = 2: " + measured("every2") + " (docs/reproduction.md)"),
    opt("forward_order", "method", "ours",
        choices=FORWARD_ORDERS,
        help="how BatchNorm's running statistics are fed; reference: as the reference scripts: AT: the "
             "train-mode attack's extra loss forward on x_adv and a clean train-mode forward after the "
             "restore; TRADES: at w+v the forwards adversarial, clean, clean (ours: clean, adversarial)"),
    opt("backend", "method", None, check=_known_backend,
        help="awpfast seam backend: reference, foreach, triton or native (default: $AWPFAST_BACKEND, "
             "else the best available)"),
    opt("model", "model and data", "small-cnn",
        choices=MODELS,
        help="architecture"),
    opt("width", "model and data", Derived(lambda a: 32 if a.model == "small-cnn" else None),
        check=Int(1, optional=True),
        type=int,
        help="small-cnn width (default: 32)"),
    opt("data", "model and data", "digits",
        choices=DATASETS,
        help="digits: scikit-learn's digits, embedded (no download); cifar10: needs --data-dir; "
             "synthetic: random prototypes, for benchmarks"),
    opt("data_dir", "model and data", None,
        help="folder with the CIFAR-10 python batches (default: none)"),
    opt("image_size", "model and data",
        Derived(lambda a: None if a.data == "cifar10" else (16 if a.model == "small-cnn" else 32)),
        check=Int(4, optional=True, plain=True),
        type=int,
        help="digits/synthetic input size (default: 16 for small-cnn, 32 otherwise; cifar10 is 32)"),
    opt("train_samples", "model and data", None, check=Int(1, optional=True),
        type=int,
        help="train on the first N images of the training split only, for quick runs (default: all)"),
    opt("val_samples", "model and data", Derived(lambda a: DEFAULT_VAL.get(a.data, 0)), check=Int(0),
        type=int,
        help="training images held out (a fixed subset) to select best.pt; 0 selects on the test split "
             "(default: 1000 on cifar10, 100 on digits and synthetic)"),
    opt("augment", "model and data", "auto",
        choices=("auto", "none", "crop", "crop+flip"),
        help="auto: crop+flip on CIFAR-10, none otherwise"),
    opt("pad_mode", "model and data", Derived(lambda a: "reflect" if a.method == "at" else "zeros", "auto"),
        choices=("auto",) + PAD_MODES,
        help="crop padding; auto: reflect for at (the AT reference), zeros for trades/mart "
             "(torchvision's RandomCrop, their references)"),
    opt("input_norm", "model and data",
        Derived(lambda a: "cifar10" if (a.method == "at" and a.data == "cifar10") else "none", "auto"),
        choices=("auto",) + INPUT_NORM_NAMES,
        help="per-channel normalization inside the model (inputs stay in [0, 1]); auto: the CIFAR-10 "
             "mean/std for at on cifar10 (the AT reference), none otherwise"),
    opt("label_noise", "model and data", 0.0, check=Float(0, hi=0.99, what=" (a fraction of the training labels)"),
        type=parse_float,
        metavar="P",
        help="symmetric label noise: a fixed fraction P of the training images (not the validation or "
             "test images) gets a label drawn uniformly from the other classes, once, seeded "
             "independently of --seed (the same noisy labels in every epoch, seed and arm)"),
    opt("extra_data", "model and data", None,
        metavar="PATH",
        help="extra training images mixed into every batch: RST's pseudo-labelled pickle ('data', "
             "'extrapolated_targets') or a generated-data .npz ('image', 'label'; memory-mapped); never "
             "used for validation or test, never label-noised (see awpfast.extra_data) (default: none)"),
    opt("extra_fraction", "model and data", Derived(lambda a: EXTRA_FRACTION if a.extra_data else None),
        type=parse_float,
        metavar="F",
        help="fraction of each batch drawn from --extra-data, uniformly with replacement (default: 0.5, "
             "RST's; the generated-data recipes use 0.7)"),
    opt("steps_per_epoch", "model and data", None,
        type=int,
        metavar="N",
        help="batches per epoch with --extra-data (default: one pass over the base training split; "
             "RST: ceil(50000 / batch size))"),
    opt("epochs", "optimization", Derived(lambda a: 30), check=Int(1), run=False,
        type=int,
        help="epochs (default: 30; on --resume: the checkpoint's)"),
    opt("batch_size", "optimization", 128, check=Int(1),
        type=int,
        help="global batch size; under torchrun it is split evenly over the processes"),
    opt("lr", "optimization", 0.1, check=Float(0, strict=True),
        type=float,
        help="peak learning rate"),
    opt("lr_schedule", "optimization", "piecewise",
        choices=LR_SCHEDULES,
        help="piecewise: x0.1 at 50%% and x0.01 at 75%% of the epochs, per iteration (the AT reference); "
             "piecewise-epoch: the same per epoch, x0.1 from 1-based epoch E/2 and x0.01 from 3E/4 "
             "(the TRADES reference: epochs 100 and 150 of 200)"),
    opt("momentum", "optimization", 0.9, check=Float(0),
        type=float,
        help="SGD momentum"),
    opt("weight_decay", "optimization", 5e-4, check=Float(0),
        type=float,
        help="SGD weight decay"),
    opt("nesterov", "optimization", False,
        action="store_true",
        help="Nesterov momentum (the RST recipe's SGD)"),
    opt("amp", "optimization", None,
        choices=("bf16", "fp16"),
        help="autocast precision (default: fp32)"),
    opt("dtype", "optimization", "float32",
        choices=DTYPE_NAMES,
        help="parameter and input dtype; float64 is for exactness checks against a float64 reference "
             "(slow; not with --amp)"),
    opt("channels_last", "optimization", False,
        action="store_true",
        help="channels-last memory format"),
    opt("compile", "optimization", False,
        action="store_true",
        help="torch.compile the model (compiling costs tens of seconds up front, measured in docs/compile.md, "
             "so it can only pay off on long runs)"),
    opt("norm", "attack", "Linf",
        choices=("Linf", "L2"),
        help="threat model"),
    opt("eps", "attack", Derived(lambda a: 8 / 255 if a.norm == "Linf" else 0.5), check=_eps,
        type=parse_float,
        help="radius (default: 8/255 Linf, 0.5 L2); '8/255' works"),
    opt("alpha", "attack", Derived(lambda a: a.eps / 4), check=Float(0),
        type=parse_float,
        help="PGD step (default: eps/4)"),
    opt("attack_steps", "attack", 10, check=Int(0),
        type=int,
        help="PGD steps in training"),
    opt("eps_warmup", "attack", 0, check=Int(0),
        type=int,
        metavar="N",
        help="ramp the training attack's eps (and its step, in proportion) linearly from 0 to --eps over "
             "the first N epochs, per iteration (eps * min(1, t / N), t = epoch + (i + 1) / iterations, "
             "the LR schedule's clock); evaluation always uses the full --eps; 0: no ramp"),
    opt("attack_bn", "attack", "eval",
        choices=("eval", "train"),
        help="model mode during the training attack (train: the reference AT recipe)"),
    opt("trades_l2_order", "attack", "renorm-clamp",
        choices=L2_ORDERS,
        help="L2 TRADES attack: renorm-clamp projects onto the eps-ball, then clamps to [0, 1] (as PGD); "
             "clamp-renorm clamps, then projects (the TRADES reference)"),
    opt("eval_steps", "attack", 20, check=Int(0),
        type=int,
        help="PGD steps of the per-epoch evaluation"),
    opt("eval_samples", "attack", None, check=Int(1, optional=True),
        type=int,
        help="test images evaluated per epoch (default: all)"),
    opt("train_eval_samples", "attack", 500, check=Int(0),
        type=int,
        help="training images (a fixed subset) evaluated per epoch, for the generalization gap; 0 skips"),
    opt("eval_every", "attack", 1, check=Int(1),
        type=int,
        metavar="K",
        help="evaluate the test split and the training subset (and --track-flatness) only every K epochs, "
             "at the last epoch and at every epoch whose validation PGD accuracy is a new best (so best.pt "
             "always has its test numbers); the validation split is evaluated every epoch; other epochs "
             "log null. Without a validation split (--val-samples 0) best.pt is chosen among the "
             "evaluated epochs"),
    opt("track_flatness", "flatness", False,
        action="store_true",
        help="log the flatness of the adversarial weight loss landscape each epoch (metrics.jsonl "
             "'flatness', plotted against the robust generalization gap): the mean over fixed "
             "filter-normalized directions d of L(w + alpha d) - L(w), L the PGD cross-entropy on a "
             "fixed training subset, eval mode, PGD regenerated at each point; the training trajectory "
             "is unchanged"),
    opt("flatness_alpha", "flatness", 0.5, check=Float(-math.inf), when=_flatness,
        type=parse_float,
        help="step along each direction, in filter norms"),
    opt("flatness_directions", "flatness", 3, check=Int(1), when=_flatness,
        type=int,
        help="random directions (the same every epoch)"),
    opt("flatness_samples", "flatness", 200, check=Int(1), when=_flatness,
        type=int,
        help="images (the first N of --flatness-split, all of it when smaller; the same every epoch)"),
    opt("flatness_split", "flatness", "val", when=_flatness,
        choices=FLATNESS_SPLITS,
        help="where the flatness images come from: val (default): the validation split, held out and "
             "never label-noised; train: the first training images (their --label-noise labels "
             "included, the behaviour before this option)"),
    opt("flatness_steps", "flatness", 10, check=Int(0), when=_flatness,
        type=int,
        help="PGD steps of the flatness attack (--eps, --alpha and --norm of the run; 0: clean loss)"),
    opt("seed", "run", 0, check=Int(0, below=2 ** 32),
        type=int,
        help="random seed"),
    opt("out", "run", Derived(_default_out), run=False,
        help="output folder, locked while a run uses it (default: runs/<method>[-awp]-<model>-<data>-"
             "s<seed>-<hash of the options that change the numbers>)"),
    opt("resume", "run", None, run=False,
        nargs="?",
        const="",
        metavar="CKPT",
        help="continue from CKPT (default: OUT/last.pt) exactly"),
    opt("overwrite", "run", False, run=False,
        action="store_true",
        help="replace the run already in --out (without it, such a folder is refused)"),
    opt("stop_after", "run", None, check=Int(1, optional=True), run=False,
        type=int,
        help="stop after this many epochs in this invocation, resume later with --resume (default: none)"),
    opt("device", "run", "auto", run=False,
        help="auto, cpu, cuda, cuda:1, ..."),
    opt("threads", "run", None, check=Int(1, optional=True),
        type=int,
        help="torch CPU threads (default: torch's choice)"),
    opt("ddp", "run", False, exclusive=True, run=False,
        action="store_true",
        help="under torchrun: DistributedDataParallel (what a torchrun launch uses by default)"),
    opt("fsdp", "run", False, exclusive=True, run=False,
        action="store_true",
        help="under torchrun: FSDP2 (fully_shard) instead of DDP"),
    opt("no_progress", "run", False, run=False,
        action="store_true",
        help="no progress bar (there is none anyway when stderr is not a terminal)"),
    opt("no_plot", "run", False, run=False,
        action="store_true",
        help="skip the PNG plot"),
    opt("quiet", "run", False, run=False,
        action="store_true",
        help="no per-epoch line either"),
)
"""Every ``awpfast-train`` option, once, in the parser's (and the resolution's) order. A :class:`Derived`
default reads only options above it."""

DEFAULTS = {o.dest: o.default for o in OPTIONS}
"""Every option's default: a plain value or a :class:`Derived` one. The parser, :func:`resolve_defaults`,
programmatic ``Namespace`` s that lack an option and checkpoints that lack one all read it."""
_BY_DEST = {o.dest: o for o in OPTIONS}
# options that define the run: taken from the checkpoint on --resume
_RUN_KEYS = tuple(o.dest for o in OPTIONS if o.run)


def parser_default(key: str):
    """What the parser stores for option ``key`` when it is not given."""
    return _BY_DEST[key].unset


def build_parser() -> argparse.ArgumentParser:
    """The ``awpfast-train`` argument parser, built from :data:`OPTIONS`."""
    p = ArgumentParser(prog="awpfast-train", description=DESCRIPTION, formatter_class=HelpFormatter)
    groups, exclusive = {}, {}
    for o in OPTIONS:
        g = groups.get(o.group) or groups.setdefault(o.group, p.add_argument_group(o.group))
        if o.exclusive:
            g = exclusive.get(o.group) or exclusive.setdefault(o.group, g.add_mutually_exclusive_group())
        g.add_argument(_opt(o.dest), default=o.unset, **o.kw)
    return p


def _distributed():
    from .. import distributed  # imports torch: only once the command line has passed preflight()
    return distributed


def preflight(args: argparse.Namespace, explicit: Optional[set] = None) -> None:
    """Check a parsed command line without importing torch (what can be checked before any file is
    read): the recipe, the derived defaults and every option's value. A new run only: a ``--resume``
    takes its options from the checkpoint, so :func:`make_config` checks it. Raises :class:`UsageError`."""
    if getattr(args, "resume", None) is not None:
        return
    probe = copy.copy(args)
    for key in DEFAULTS:
        if not hasattr(probe, key):
            setattr(probe, key, parser_default(key))
    apply_recipe(probe, explicit if explicit is not None else set())
    resolve_defaults(probe)
    validate_args(probe)


# ----------------------------------------------------------------------------- configuration
@dataclass
class RunConfig:
    """Everything a run needs, validated: built by :func:`make_config` before any file is touched."""
    args: argparse.Namespace
    device: "torch.device"
    dist: "DistInfo" = field(default_factory=lambda: _distributed().DistInfo())
    resume_path: Optional[str] = None
    checkpoint: Optional[dict] = None
    notes: List[str] = field(default_factory=list)
    finished: bool = False  # --resume of a run that already trained all its epochs (only its files get repaired)
    run_id: str = ""        # the run's identity: in args.json and every checkpoint; --resume keeps it
    resume_stat: Optional[tuple] = None  # (mtime_ns, size) of the --resume file when it was read
    options: Optional["Options"] = None  # ``args`` typed and split by concern (what the loop reads)

    def __post_init__(self):
        if self.options is None:
            self.options = Options.from_args(self.args)


def recheck(cfg: RunConfig) -> None:
    """Repeat, under the run folder's lock, the checks whose answer another process could have changed
    since :func:`make_config` (the folder's files, the ``--resume`` checkpoint). Raises :class:`UsageError`."""
    _check_out(cfg.args, cfg.resume_path)
    if cfg.resume_path is not None:
        st = os.stat(cfg.resume_path)
        if (st.st_mtime_ns, st.st_size) != cfg.resume_stat:
            raise UsageError(f"--resume {cfg.resume_path} changed while this command started (another run wrote "
                             "it): run the command again")


def resolve_defaults(args) -> argparse.Namespace:
    """Fill the options left unset (in place; returns ``args``): derived defaults in the table's order,
    plain defaults for options a programmatic ``Namespace`` lacks or holds as ``None``."""
    for key, val in DEFAULTS.items():
        if not isinstance(val, Derived) and getattr(args, key, None) is None:
            setattr(args, key, val)
    for key, val in DEFAULTS.items():
        if isinstance(val, Derived) and getattr(args, key, None) in (None, val.unset):
            setattr(args, key, val.fn(args))
    return args


def _check_extra(args) -> None:
    """``--extra-data`` and its options (the file's contents are checked when it is opened)."""
    if not args.extra_data:
        if args.recipe and args.recipe.startswith("rst"):
            raise UsageError(f"--recipe {args.recipe} trains on extra data: give --extra-data PATH (RST's "
                             "ti_500K_pseudo_labeled.pickle, or a .npz with 'image' and 'label')")
        for key in ("extra_fraction", "steps_per_epoch"):
            if getattr(args, key) is not None:
                raise UsageError(f"{_opt(key)} applies with --extra-data PATH only: give the extra data or drop it")
        return
    if not os.path.isfile(args.extra_data):
        raise UsageError(f"--extra-data {args.extra_data}: no such file (an RST .pickle or a .npz with 'image' and "
                         "'label')")
    Float(0, strict=True, hi=0.99, what=" (the share of each batch from --extra-data)")(args, "extra_fraction")
    Int(1, optional=True)(args, "steps_per_epoch")


def validate_args(args) -> None:
    """Check every option (after :func:`resolve_defaults`): each one's own check from :data:`OPTIONS`, in
    the table's order, then the checks between options. Raises :class:`UsageError`."""
    for o in OPTIONS:
        o.validate(args)
    if args.data == "cifar10" and args.image_size is not None and args.image_size != 32:
        raise UsageError(f"CIFAR-10 images are 32x32: drop --image-size {args.image_size}")
    if args.alpha == 0 and args.eps > 0 and args.attack_steps > 0:
        raise UsageError("--alpha 0 makes PGD a no-op: give a step > 0 (default eps/4)")
    if args.data == "cifar10" and not args.data_dir:
        raise UsageError("--data cifar10 needs --data-dir PATH: a folder holding the CIFAR-10 python batches "
                         "(cifar-10-python.tar.gz, extracted)")
    if args.model != "small-cnn" and args.width is not None:
        raise UsageError(f"--width applies to small-cnn only, not to {args.model}: drop it")
    _check_extra(args)
    if args.dtype != "float32" and args.amp:
        raise UsageError(f"--dtype {args.dtype} and --amp {args.amp} contradict each other: drop one of them")
    if args.forward_order == "reference" and args.method not in ("at", "trades"):
        raise UsageError(f"--forward-order reference follows the AT and TRADES reference scripts; --method "
                         f"{args.method} has none: drop --forward-order")
    _check_ascent(args)
    if args.track_flatness:
        if args.flatness_alpha == 0:
            raise UsageError("--flatness-alpha 0 makes the flatness 0 by definition: give a step such as 0.5")
        if args.flatness_split == "val" and not args.val_samples:
            raise UsageError("--track-flatness measures on the validation split by default but --val-samples is 0: "
                             "give --val-samples N, or --flatness-split train (the first training images, "
                             "label noise included)")


def _check_ascent(args) -> None:
    """The AWP ascent options against each other and against the rule."""
    if args.awp_ascent == "attack" and args.attack_steps == 0:
        raise UsageError("--awp-ascent attack takes the AWP direction from the attack's last step and "
                         "--attack-steps is 0: give --attack-steps >= 1 or --awp-ascent separate")
    if args.awp_ascent != "separate" and args.awp_steps > 1:
        raise UsageError(f"--awp-ascent {args.awp_ascent} gives one direction per step and --awp-steps "
                         f"{args.awp_steps} needs a new one at each ascent step: use --awp-steps 1 or --awp-ascent "
                         "separate")
    if args.awp_every > 1 and args.awp_steps > 1:
        raise UsageError(f"--awp-every {args.awp_every} re-uses a one-step direction: drop it or use --awp-steps 1")
    if args.awp_ascent_fraction < 1 and args.awp_ascent != "separate":
        raise UsageError(f"--awp-ascent-fraction applies to the separate ascent pass, not to --awp-ascent "
                         f"{args.awp_ascent}: drop one of them")
    if args.awp_ascent == "momentum":
        if args.awp_every > 1:
            raise UsageError("--awp-ascent momentum runs no ascent pass, so --awp-every has nothing to save: drop it")
        if not float(args.momentum) > 0:
            raise UsageError("--awp-ascent momentum reads SGD's momentum buffer and --momentum is 0: give "
                             "--momentum > 0 or another --awp-ascent")
    if args.awp_rule == "rwp":
        if args.method != "at":
            raise UsageError(f"--awp-rule rwp masks the per-example adversarial cross-entropy of AT (its reference "
                             f"trains AT); --method {args.method} has no such loss: use --method at or --awp-rule awp")
        bad = [f for f, on in (("--awp-ascent " + args.awp_ascent, args.awp_ascent != "separate"),
                               (f"--awp-every {args.awp_every}", args.awp_every > 1),
                               (f"--awp-steps {args.awp_steps}", args.awp_steps > 1),
                               (f"--awp-ascent-fraction {args.awp_ascent_fraction:g}", args.awp_ascent_fraction < 1))
               if on]
        if bad:
            raise UsageError(f"{bad[0]} is an option of --awp-rule awp; --awp-rule rwp takes its own ascent passes "
                             "(--rwp-steps): drop it")


def _check_warmups(args, explicit: set, notes: List[str]) -> None:
    """A warm-up as long as the run: refused when given explicitly (the run would not do what its start
    line says), a note when it is a default (TRADES' 10 AWP warm-up epochs in a short run)."""
    for key, what, active in (("awp_warmup", "AWP would never switch on", args.awp_gamma > 0),
                              ("eps_warmup", "the attack would never reach --eps", args.eps_warmup > 0)):
        n = getattr(args, key)
        long = n >= args.epochs if key == "awp_warmup" else n > args.epochs
        if not (active and long):
            continue
        msg = f"{_opt(key)} {n} with --epochs {args.epochs}: {what}"
        if key in explicit:
            raise UsageError(msg + f"; shorten {_opt(key)} or train longer")
        source = f"--recipe {args.recipe}" if args.recipe and key in RECIPES[args.recipe] else f"--method {args.method}"
        notes.append(msg + f" (the {_opt(key)} of {source}; give a shorter one to change it)")


def _check_out(args, resume_path: Optional[str]) -> None:
    out = args.out
    check_out_dir(out, "--out")
    from ..checkpoint import run_files
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
    for key in DEFAULTS:
        if not hasattr(args, key):
            setattr(args, key, parser_default(key))
    if explicit is None:
        explicit = {k for k, v in vars(args).items()
                    if v is not None and v != (parser_default(k) if k in DEFAULTS else None)}
    dist = _distributed().dist_from_env(args.ddp, args.fsdp)
    notes: List[str] = []
    ckpt = resume_path = resume_stat = None
    if args.resume is not None:
        if args.out is None and args.resume:
            args.out = os.path.dirname(os.path.abspath(args.resume))
        if args.out is None:
            raise UsageError("--resume without a path needs --out DIR (the run to continue)")
        resume_path = args.resume or os.path.join(args.out, "last.pt")
        from ..checkpoint import check_belongs, read_checkpoint
        st = os.stat(resume_path) if os.path.isfile(resume_path) else None
        ckpt = read_checkpoint(resume_path, "--resume")
        resume_stat = (st.st_mtime_ns, st.st_size) if st is not None else None
        check_belongs(ckpt, resume_path, args.out)
        saved = dict(ckpt["args"])
        missing = []
        for k in _RUN_KEYS:
            if k not in saved:  # an option newer than the checkpoint: the one given, else today's default
                if k not in explicit:
                    missing.append(_opt(k))
                    setattr(args, k, None)
                continue
            old = saved[k]
            given = getattr(args, k, None)
            if k == "width" and k in explicit and saved.get("model") != "small-cnn":
                notes.append(f"--resume: --width applies to small-cnn only and the checkpoint holds a "
                             f"{saved.get('model')}: --width {given} is ignored")
            elif k in explicit and given != old:
                notes.append(f"--resume: {_opt(k)} {given!r} differs from the checkpoint's {old!r}; "
                             "using the checkpoint's")
            setattr(args, k, old)
        if missing:
            notes.append(f"--resume: the checkpoint records no {', '.join(missing)} (written before "
                         f"{'that option' if len(missing) == 1 else 'those options'} existed): today's default is "
                         "used, so the continuation may differ from how the run began; give the value it ran with "
                         "to keep it")
        if "no_plot" not in explicit:  # the run's outputs stay as they were (the plot, or none)
            args.no_plot = bool(saved.get("no_plot", False))
        if dist.enabled and saved.get("fsdp") and dist.mode != "fsdp" and not args.ddp:
            raise UsageError(f"--resume {resume_path}: the run trained under FSDP2 (--fsdp); pass --fsdp to continue "
                             "it so, or --ddp to switch it to DistributedDataParallel deliberately")
        if dist.enabled and dist.mode != ("fsdp" if saved.get("fsdp") else "ddp") and int(ckpt.get("world_size", 1)) > 1:
            notes.append(f"--resume: the run trained under {'FSDP2' if saved.get('fsdp') else 'DDP'} and continues "
                         f"under {'FSDP2' if dist.mode == 'fsdp' else 'DDP'}: the same numbers up to rounding, no "
                         "longer bit for bit")
        saved_device = saved.get("device", "auto")
        if "device" in explicit and args.device != saved_device:
            notes.append(f"--resume: --device {args.device} differs from the checkpoint's {saved_device!r}; using "
                         f"{args.device}: the continuation is then no longer bit-exact")
        if args.epochs is None:
            args.epochs = saved["epochs"]
        elif args.epochs != saved["epochs"] and args.lr_schedule != "constant":
            notes.append(f"--resume: --epochs {args.epochs} (the checkpoint planned {saved['epochs']}) also "
                         f"stretches the {args.lr_schedule} LR schedule to {args.epochs} epochs")
    else:
        apply_recipe(args, explicit)
    resolve_defaults(args)
    validate_args(args)
    if resume_path is None:
        _check_warmups(args, explicit, notes)
    if dist.enabled and args.batch_size % dist.world_size:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch and must split evenly over "
                         f"{dist.world_size} processes")
    if dist.mode == "fsdp" and args.awp_ascent == "attack":
        raise UsageError("--awp-ascent attack is not available with --fsdp (autograd cannot reach the sharded "
                         "weights): use --awp-ascent separate, with --awp-every K to compute it every K steps")
    if dist.mode == "fsdp" and args.compile:
        raise UsageError("--fsdp with --compile is not supported yet: drop one of them")
    if dist.mode == "fsdp" and args.track_flatness:
        raise UsageError("--track-flatness is not supported with --fsdp yet (the landscape moves whole weights): "
                         "use DDP (the default under torchrun) or drop --track-flatness")
    device = resolve_device(args.device, dist)
    _check_out(args, resume_path)
    finished = ckpt is not None and int(ckpt["epoch"]) >= args.epochs  # run() repairs its files, or refuses
    import uuid
    run_id = (ckpt.get("run_id") if ckpt is not None else None) or uuid.uuid4().hex
    return RunConfig(args=args, device=device, dist=dist, resume_path=resume_path, checkpoint=ckpt, notes=notes,
                     finished=finished, run_id=run_id, resume_stat=resume_stat)


# ----------------------------------------------------------------------------- typed options per concern
SECTIONS = {"method": "method", "model and data": "data", "optimization": "optim", "attack": "attack",
            "flatness": "flatness", "run": "run"}
"""The option table's groups and the :class:`Options` attribute each becomes."""


def _field(o: Option) -> str:
    """An option's name inside its section: the section's prefix dropped (``attack_steps`` -> ``attack.steps``)."""
    prefix = SECTIONS[o.group] + "_"
    return o.dest[len(prefix):] if o.dest.startswith(prefix) else o.dest


def _annotation(o: Option):
    kw = o.kw
    if kw.get("action") == "store_true":
        return bool
    t = {int: int, float: float, parse_float: float}.get(kw.get("type"), str)
    return Optional[t] if o.unset is None or isinstance(o.default, Derived) else t


def _section(group: str) -> type:
    name = SECTIONS[group].capitalize() + "Options"
    fields = [(_field(o), _annotation(o)) for o in OPTIONS if o.group == group]
    cls = make_dataclass(name, fields, frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = f"The validated ``{group}`` options of a run (generated from :data:`OPTIONS`)."
    return cls


_SECTION_TYPES = {sec: _section(group) for group, sec in SECTIONS.items()}
MethodOptions, DataOptions, OptimOptions, AttackOptions, FlatnessOptions, RunOptions = _SECTION_TYPES.values()


@dataclass(frozen=True)
class Options:
    """A run's validated options, typed and split by concern (``o.attack.eps``, ``o.method.awp_gamma``,
    ``o.optim.lr``); built by :func:`make_config` from the resolved Namespace, which stays the record
    (``args.json``, checkpoints)."""
    method: MethodOptions
    data: DataOptions
    optim: OptimOptions
    attack: AttackOptions
    flatness: FlatnessOptions
    run: RunOptions

    @classmethod
    def from_args(cls, args) -> "Options":
        parts = {sec: {} for sec in SECTIONS.values()}
        for o in OPTIONS:
            parts[SECTIONS[o.group]][_field(o)] = getattr(args, o.dest)
        return cls(**{sec: _SECTION_TYPES[sec](**kw) for sec, kw in parts.items()})


def section_of(dest: str) -> tuple:
    """``(section, field)`` of option ``dest`` in :class:`Options`."""
    o = _BY_DEST[dest]
    return SECTIONS[o.group], _field(o)
