"""Evaluate a checkpoint: ``python -m awpfast.evaluate CHECKPOINT``.

Reports clean accuracy, PGD-20 and PGD-100 accuracy (L-inf or L2, random start) on the test
split, and AutoAttack ``version='standard'`` through whichever implementation is installed:
the official ``autoattack`` package, else ``torchattacks`` (``make autoattack``, i.e.
``pip install --no-deps torchattacks``: its declared torchvision would replace torch;
APGD-CE, APGD-T, FAB-T, Square), else a message saying how to get one. The model, data,
input normalization and threat model come from the checkpoint (an ``awpfast-train``
``best.pt`` / ``last.pt``); options override them. A bare ``state_dict`` (e.g. a reference
or RobustBench checkpoint) works with ``--model``.

Every option is checked before the (long) evaluation starts; errors are one line (set
``AWPFAST_DEBUG=1`` for the traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F

from .attacks import PGD
from .checkpoint import read_model_checkpoint
from .cli import (ArgumentParser, HelpFormatter, UsageError, check_out_file, cli_main, parse_float, resolve_device,
                  write_json)
from .data import DATASETS, Batches, Split, heldout_split, load_dataset, to_float
from .distributed import dist_sum
from .errors import check_interrupted
from .models import INPUT_NORMS, MODEL_NAMES, build_model

__all__ = ["main", "load_checkpoint", "evaluate_checkpoint", "evaluate_split", "autocast", "autoattack_accuracy",
           "autoattack_backend", "guess_model", "make_eval_config"]

AUTOATTACK_HINT = ("AutoAttack: skipped - neither `autoattack` nor `torchattacks` is installed. Install one: "
                   "pip install scipy && pip install --no-deps torchattacks (without --no-deps its torchvision "
                   "dependency replaces your torch; or pip install git+https://github.com/fra31/auto-attack), then "
                   "rerun this command.")
AUTOATTACK_IMPLS = ("auto", "autoattack", "torchattacks", "off")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m awpfast.evaluate`` argument parser."""
    p = ArgumentParser(prog="python -m awpfast.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="an awpfast-train best.pt / last.pt, or a bare state_dict")
    p.add_argument("--model", choices=MODEL_NAMES, default=None,
                   help="architecture (default: the checkpoint's; needed for a bare state_dict)")
    p.add_argument("--width", type=int, default=None,
                   help="small-cnn width (default: the checkpoint's, or read off a bare state_dict)")
    p.add_argument("--data", choices=DATASETS, default=None, help="dataset (default: the checkpoint's, else digits)")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default: the checkpoint's)")
    p.add_argument("--image-size", type=int, default=None,
                   help="digits/synthetic input size (default: the checkpoint's, when its dataset is used)")
    p.add_argument("--input-norm", choices=tuple(INPUT_NORMS), default=None,
                   help="normalization inside the model (default: the checkpoint's; none for a bare state_dict)")
    p.add_argument("--norm", choices=("Linf", "L2"), default=None, help="threat model (default: the checkpoint's)")
    p.add_argument("--eps", type=parse_float, default=None, help="default: the checkpoint's (8/255 Linf, 0.5 L2)")
    p.add_argument("--alpha", type=parse_float, default=None, help="default: the checkpoint's (eps/4)")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 100], help="PGD step counts")
    p.add_argument("--samples", type=int, default=None, help="evaluate the first N test images (default: all)")
    p.add_argument("--split", choices=("test", "heldout"), default="test",
                   help="test: the data set's test split; heldout: the test split plus every training image the "
                        "checkpoint's run neither trained on nor validated with (its --train-samples cut; "
                        "digits with --train-samples 320: 1377 images)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--autoattack", choices=AUTOATTACK_IMPLS, default="auto",
                   help="AutoAttack implementation; auto: autoattack if installed, else torchattacks, else skipped")
    p.add_argument("--no-autoattack", action="store_true", help="skip AutoAttack (same as --autoattack off)")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="autocast precision (default: fp32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the PGD random starts and AutoAttack; awpfast-train's per-epoch evaluation "
                        "draws its starts from the run's own random stream instead, so its PGD-20 of the same "
                        "weights differs by the random start's noise (about 1 point on 500 images)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    return p


# ----------------------------------------------------------------------------- clean and PGD accuracy
def autocast(device: torch.device, amp: Optional[str]):
    """``torch.autocast`` for ``--amp bf16`` / ``fp16`` on ``device``; a no-op context without ``amp``."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def evaluate_split(model, split, batch_size: int, eps: float, alpha: float, steps: int, norm: str = "Linf",
                   device="cpu", amp: Optional[str] = None, channels_last: bool = False, limit: Optional[int] = None,
                   backend: Optional[str] = None, random_start: bool = True, rank: int = 0,
                   world_size: int = 1, check_finite: bool = False) -> dict:
    """Clean and PGD-``steps`` accuracy (and mean CE) on a split, in eval mode.

    With ``world_size > 1`` each process evaluates every ``world_size``-th example of the first
    ``limit`` and the sums are all-reduced: every process returns the same numbers. The shards
    are padded to equal length (padding examples are not counted), so that every process runs
    the same number of forwards, as FSDP needs. ``check_finite``: raise ``FloatingPointError`` on
    non-finite logits instead of counting them."""
    device = torch.device(device)
    split = split.subset(limit)
    real = None
    if world_size > 1:
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
            check_interrupted()
            if x.dtype != dtype and dtype == torch.float64:
                x = x.to(dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                with torch.no_grad():
                    lc = model(x).float()
                x_adv = attack(x, y) if steps > 0 else x
                with torch.no_grad():
                    lr_ = model(x_adv).float()
            w = torch.ones(len(y), dtype=torch.float64, device=device) if real is None \
                else real[n:n + len(y)].double()
            n += len(y)
            if check_finite and not (torch.isfinite(lc).all() and torch.isfinite(lr_).all()):
                raise FloatingPointError("the model's logits are NaN or inf on the test images: the accuracies would "
                                         "mean nothing; check the checkpoint's weights and --amp")
            sums += torch.stack([((lc.argmax(1) == y).double() * w).sum(), ((lr_.argmax(1) == y).double() * w).sum(),
                                 (F.cross_entropy(lc, y, reduction="none").double() * w).sum(),
                                 (F.cross_entropy(lr_, y, reduction="none").double() * w).sum()])
    finally:
        model.train(was)
    if real is not None:
        n = int(real.sum())
    c_ok, r_ok, c_loss, r_loss, n = dist_sum(sums.tolist() + [float(n)], device, world_size)
    n = int(n)
    d = max(n, 1)
    return {"clean_acc": c_ok / d, "robust_acc": r_ok / d, "clean_loss": c_loss / d, "robust_loss": r_loss / d,
            "n": n}


# ----------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str) -> dict:
    """``{"model": state_dict, "args": {...} or {}, ...}`` from an awpfast-train checkpoint or a bare
    state_dict; a one-line :class:`UsageError` for anything else (empty, truncated, not a checkpoint).
    See :func:`awpfast.checkpoint.read_model_checkpoint`."""
    return read_model_checkpoint(path)


def guess_model(sd: dict) -> Optional[str]:
    """The awpfast architecture a state_dict's keys belong to (``None`` if none fits)."""
    keys = set(sd)
    if "features.0.0.weight" in keys and "fc1.weight" in keys:
        return "small-cnn"
    if "layer1.0.conv1.weight" in keys and "linear.weight" in keys:
        return "preact18"
    if "block1.layer.0.conv1.weight" in keys and "fc.weight" in keys:
        n = len({k.split(".")[2] for k in keys if k.startswith("block1.layer.")})
        return {5: "wrn34-10", 4: "wrn28-10"}.get(n)
    return None


def _num_classes(sd: dict) -> Optional[int]:
    for k in ("fc2.weight", "linear.weight", "fc.weight"):
        if k in sd:
            return int(sd[k].shape[0])
    return None


def _load_weights(model, sd: dict, name: str, path: str) -> None:
    """``load_state_dict`` with a one-line explanation instead of torch's list of keys: the option that
    differs when it can be named (small-cnn's ``--width``, ``--input-norm``), and non-finite weights
    refused (a diverged run would otherwise report near-chance accuracy as a result)."""
    res_keys = set(model.state_dict())
    missing, unexpected = sorted(res_keys - set(sd)), sorted(set(sd) - res_keys)
    if missing or unexpected:
        guess = guess_model(sd)
        if guess == name and all(k.endswith(("mean", "std")) for k in missing + unexpected):
            hint = ("; the checkpoint's input normalization differs: pass --input-norm "
                    f"{'cifar10' if unexpected else 'none'}")
        elif guess and guess != name:
            hint = f"; they look like a {guess} checkpoint: pass --model {guess}"
        else:
            hint = "; pass the checkpoint's architecture with --model"
        raise UsageError(f"{path}: the weights do not fit {name} ({len(missing)} missing keys, e.g. "
                         f"{missing[:1]}, {len(unexpected)} unexpected, e.g. {unexpected[:1]}){hint}")
    own = model.state_dict()
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            width = f" (the checkpoint's small-cnn --width is {int(sd['features.0.0.weight'].shape[0])}: drop " \
                    "--width or pass that)" if name == "small-cnn" and "features.0.0.weight" in sd else \
                    f" (the checkpoint is not a {name} of this size: check --model)"
            raise UsageError(f"{path}: the weights do not fit {name}: {k} is {tuple(v.shape)} in the checkpoint, "
                             f"{tuple(own[k].shape)} in the model{width}")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UsageError(f"{path}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]}): the run diverged; "
                         "evaluate an earlier checkpoint (best.pt) instead")
    model.load_state_dict(sd)


# ----------------------------------------------------------------------------- AutoAttack
def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:
        mod = sys.modules.get(pkg)
        return str(getattr(mod, "__version__", "unknown"))


def autoattack_backend(choice: str = "auto") -> Optional[str]:
    """The AutoAttack implementation to use: ``"autoattack"``, ``"torchattacks"`` or ``None``
    (not installed / ``off``). Raises :class:`UsageError` when a named one is missing."""
    if choice == "off":
        return None
    found = []
    for pkg in ("autoattack", "torchattacks"):
        try:
            __import__(pkg)
            found.append(pkg)
        except ImportError:
            pass
    if choice == "auto":
        return found[0] if found else None
    if choice not in found:
        how = "--no-deps torchattacks" if choice == "torchattacks" else "git+https://github.com/fra31/auto-attack"
        raise UsageError(f"--autoattack {choice}: the {choice} package is not installed (pip install {how})")
    return choice


def autoattack_accuracy(model, x, y, norm: str, eps: float, batch_size: int, impl: Optional[str] = "auto",
                        num_classes: int = 10, seed: int = 0) -> Optional[float]:
    """Robust accuracy under AutoAttack ``standard`` (APGD-CE, APGD-T, FAB-T, Square), or ``None``
    when no implementation is installed. ``impl``: ``"autoattack"``, ``"torchattacks"`` or ``"auto"``."""
    impl = autoattack_backend(impl) if impl in ("auto", None) else impl
    if impl is None:
        return None
    was = model.training
    model.eval()
    try:
        if impl == "autoattack":
            from autoattack import AutoAttack
            adversary = AutoAttack(model, norm=norm, eps=eps, version="standard", seed=seed, verbose=False,
                                   device=str(x.device))
            x_adv = adversary.run_standard_evaluation(x, y, bs=batch_size)
        else:
            import torchattacks
            adversary = torchattacks.AutoAttack(model, norm=norm, eps=eps, version="standard",
                                                n_classes=num_classes, seed=seed)
            x_adv = torch.cat([adversary(x[i:i + batch_size], y[i:i + batch_size])
                               for i in range(0, len(y), batch_size)]) if len(y) else x
        with torch.no_grad():
            ok = sum(int((model(x_adv[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                     for i in range(0, len(y), batch_size))
    finally:
        model.train(was)
    return ok / max(len(y), 1)


# ----------------------------------------------------------------------------- configuration
@dataclass
class EvalConfig:
    """A validated evaluation: everything is checked before any attack runs."""
    args: argparse.Namespace
    ckpt: dict
    model_name: str
    width: Optional[int]
    data: str
    data_dir: Optional[str]
    image_size: Optional[int]
    input_norm: str
    norm: str
    eps: float
    alpha: float
    device: torch.device
    autoattack: Optional[str]
    notes: List[str] = field(default_factory=list)


def _positive(v, what, lo=1):
    if v is not None and (not isinstance(v, int) or v < lo):
        raise UsageError(f"{what} must be an integer >= {lo}, got {v!r}")


def _finite(v, what, strict=False):
    import math
    if v is not None and not (math.isfinite(v) and (v > 0 if strict else v >= 0)):
        raise UsageError(f"{what} must be a finite number {'>' if strict else '>='} 0, got {v!r}")


def make_eval_config(args) -> EvalConfig:
    """Check the options, the checkpoint and the ``--json`` target; nothing is evaluated yet."""
    _positive(args.samples, "--samples")
    _positive(args.batch_size, "--batch-size")
    _positive(args.width, "--width")
    _positive(args.image_size, "--image-size", 4)
    for s in args.steps:
        _positive(s, "--steps", 0)
    _finite(args.eps, "--eps")
    _finite(args.alpha, "--alpha")
    if args.seed is not None and not (0 <= args.seed < 2 ** 32):
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
    check_out_file(args.json, "--json", overwrite=getattr(args, "overwrite", False))
    aa = autoattack_backend("off" if args.no_autoattack else args.autoattack)
    ck = load_checkpoint(args.checkpoint)
    saved = ck["args"]
    notes = []

    def pick(k, default=None):
        v = getattr(args, k, None)
        return v if v is not None else saved.get(k, default)

    model_name = args.model or saved.get("model")
    if saved.get("model") and args.model and args.model != saved["model"]:
        raise UsageError(f"{args.checkpoint} holds a {saved['model']} (trained by awpfast-train); --model "
                         f"{args.model} does not match it: drop --model")
    if model_name is None:
        guess = guess_model(ck["model"])
        raise UsageError("this checkpoint does not say its architecture: pass --model "
                         f"({', '.join(MODEL_NAMES)})" + (f"; its keys look like {guess}" if guess else ""))
    width = pick("width")
    if model_name == "small-cnn" and width is None and "features.0.0.weight" in ck["model"]:
        width = int(ck["model"]["features.0.0.weight"].shape[0])
    if model_name != "small-cnn" and args.width is not None:
        raise UsageError(f"--width applies to small-cnn only, not to {model_name}: drop it")
    data = pick("data", "digits")
    if saved.get("data") and data != saved["data"]:
        notes.append(f"the model was trained on {saved['data']}; evaluating it on {data}")
    # the image size belongs to the checkpoint's dataset: carry it over only when that is the one used
    image_size = args.image_size if args.image_size is not None else \
        (saved.get("image_size") if data == saved.get("data") else None)
    trained_size = ck.get("image_size") or saved.get("image_size")
    if args.image_size is not None and trained_size and data == saved.get("data") and args.image_size != trained_size:
        notes.append(f"the model was trained on {trained_size}x{trained_size} images; --image-size {args.image_size} "
                     f"evaluates it on {args.image_size}x{args.image_size} ones (another input distribution: drop "
                     "--image-size to evaluate it as trained)")
    if data == "cifar10":
        if args.image_size not in (None, 32):
            raise UsageError(f"CIFAR-10 images are 32x32: drop --image-size {args.image_size}")
        image_size = None
        if not pick("data_dir"):
            raise UsageError("--data cifar10 needs --data-dir PATH (the folder with the CIFAR-10 python batches)")
    elif image_size is None:
        image_size = 16 if model_name == "small-cnn" else 32
    input_norm = pick("input_norm", "none")
    norm = pick("norm", "Linf")
    eps = pick("eps", 8 / 255 if norm == "Linf" else 0.5)
    if args.alpha is not None:
        alpha = args.alpha
    elif args.eps is None and args.norm is None and saved.get("alpha") is not None:
        alpha = saved["alpha"]
    else:
        alpha = eps / 4
    if norm == "Linf" and eps > 1:
        raise UsageError(f"--eps {eps} is larger than the whole [0, 1] input range")
    device = resolve_device(args.device)
    return EvalConfig(args=args, ckpt=ck, model_name=model_name, width=width, data=data,
                      data_dir=pick("data_dir"), image_size=image_size, input_norm=input_norm, norm=norm,
                      eps=float(eps), alpha=float(alpha), device=device, autoattack=aa, notes=notes)


def evaluate_checkpoint(args) -> dict:
    """Evaluate (``args`` from :func:`build_parser`, or an :class:`EvalConfig`); returns the results dict."""
    cfg = args if isinstance(args, EvalConfig) else make_eval_config(args)
    args, ck = cfg.args, cfg.ckpt
    for n in cfg.notes:
        print(f"awpfast.evaluate: note: {n}", file=sys.stderr)
    ds = load_dataset(cfg.data, cfg.data_dir, cfg.image_size)
    num_classes = ck["num_classes"] or _num_classes(ck["model"]) or ds.num_classes
    model = build_model(cfg.model_name, num_classes, ds.in_channels, cfg.width, cfg.input_norm)
    _load_weights(model, ck["model"], cfg.model_name, args.checkpoint)
    device = cfg.device
    model.to(device).eval()
    torch.manual_seed(args.seed)
    res = {"checkpoint": args.checkpoint, "epoch": ck["epoch"], "model": cfg.model_name, "data": cfg.data,
           "input_norm": cfg.input_norm, "norm": cfg.norm, "eps": cfg.eps, "alpha": cfg.alpha, "n": None,
           "seed": args.seed}
    t0 = time.perf_counter()
    clean = None
    test = ds.test
    if getattr(args, "split", "test") == "heldout":
        saved = ck["args"]
        if cfg.data != saved.get("data"):
            raise UsageError(f"--split heldout needs the checkpoint's own data set ({saved.get('data')}), not "
                             f"{cfg.data}")
        test = heldout_split(ds, saved.get("val_samples"), saved.get("train_samples"))
    res["split"] = getattr(args, "split", "test")
    for steps in args.steps:
        r = evaluate_split(model, test, args.batch_size, cfg.eps, cfg.alpha, steps, cfg.norm, device=device,
                           amp=args.amp, limit=args.samples, check_finite=True)
        res["n"] = r["n"]
        clean = r["clean_acc"]
        res[f"pgd{steps}_acc"] = r["robust_acc"]
    if clean is None:
        r = evaluate_split(model, test, args.batch_size, cfg.eps, cfg.alpha, 0, cfg.norm, device=device,
                           limit=args.samples, check_finite=True)
        res["n"], clean = r["n"], r["clean_acc"]
    res["clean_acc"] = clean
    res["versions"] = {"torch": torch.__version__, "awpfast": _version("awpfast")}
    if cfg.autoattack is None:
        res["autoattack_acc"] = None
        res["autoattack"] = "skipped (--autoattack off)" if (args.no_autoattack or args.autoattack == "off") \
            else AUTOATTACK_HINT
    else:
        split = test.subset(args.samples)
        x, y = to_float(split.x).to(device), split.y.to(device)
        res["autoattack_acc"] = autoattack_accuracy(model, x, y, cfg.norm, cfg.eps, args.batch_size,
                                                    impl=cfg.autoattack, num_classes=num_classes, seed=args.seed)
        res["autoattack"] = f"standard ({cfg.autoattack} {_version(cfg.autoattack)})"
        res["versions"][cfg.autoattack] = _version(cfg.autoattack)
    res["time_s"] = time.perf_counter() - t0
    return res


def main(argv=None) -> int:
    """``python -m awpfast.evaluate``: returns the exit status (0 ok, 2 bad input, 1 failure)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)

    def body(args):
        res = evaluate_checkpoint(args)
        print(f"{res['checkpoint']} (epoch {res['epoch']}): {res['model']} on {res['data']}, {res['n']} {res['split']} images, "
              f"{res['norm']} eps={res['eps']:.4g} alpha={res['alpha']:.4g}, seed {res['seed']} (PGD random starts)")
        print(f"  clean        {100 * res['clean_acc']:6.2f} %")
        for s in args.steps:
            print(f"  PGD-{s:<8d} {100 * res[f'pgd{s}_acc']:6.2f} %")
        if res["autoattack_acc"] is not None:
            print(f"  AutoAttack   {100 * res['autoattack_acc']:6.2f} %   ({res['autoattack']})")
        else:
            print(f"  {res['autoattack']}")
        if args.json:
            write_json(args.json, res, indent=1)
        return 0

    return cli_main("awpfast.evaluate", lambda: parser.parse_args(argv), body)


if __name__ == "__main__":
    sys.exit(main())
