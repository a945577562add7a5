"""Evaluate a checkpoint: ``python -m awpfast.evaluate CHECKPOINT``.

Reports clean accuracy, PGD-20 and PGD-100 accuracy (L-inf or L2, random start) on the test
split, and AutoAttack ``version='standard'`` when the ``autoattack`` package is importable
(a clear message otherwise). The model, data and threat model come from the checkpoint
(an ``awpfast-train`` ``best.pt`` / ``last.pt``); options override them. A bare
``state_dict`` (e.g. a reference or RobustBench checkpoint) works with ``--model``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .data import DATASETS, load_dataset, to_float
from .train import CKPT_FORMAT, build_model, evaluate_split, parse_float

__all__ = ["main", "load_checkpoint", "evaluate_checkpoint", "autoattack_accuracy"]

AUTOATTACK_HINT = ("AutoAttack: skipped - the `autoattack` package is not installed. Install it with "
                   "pip install git+https://github.com/fra31/auto-attack (then rerun this command).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m awpfast.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--model", default=None, help="architecture (needed for a bare state_dict)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--data", choices=DATASETS, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--norm", choices=("Linf", "L2"), default=None)
    p.add_argument("--eps", type=parse_float, default=None, help="default: the checkpoint's (8/255 Linf, 0.5 L2)")
    p.add_argument("--alpha", type=parse_float, default=None, help="default: the checkpoint's (eps/4)")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 100], help="PGD step counts")
    p.add_argument("--samples", type=int, default=None, help="evaluate the first N test images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-autoattack", action="store_true", help="skip AutoAttack even if installed")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def load_checkpoint(path: str) -> dict:
    """``{"model": state_dict, "args": {...} or {}}`` from an awpfast-train checkpoint or a bare state_dict."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and obj.get("format") == CKPT_FORMAT:
        return {"model": obj["model"], "args": dict(obj["args"]), "epoch": obj.get("epoch"),
                "num_classes": obj.get("num_classes", 10), "in_channels": obj.get("in_channels", 3)}
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            sd = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}
            return {"model": sd, "args": {}, "epoch": None, "num_classes": None, "in_channels": 3}
    raise ValueError(f"{path}: not an awpfast-train checkpoint nor a model state_dict")


def autoattack_accuracy(model, x, y, norm: str, eps: float, batch_size: int):
    """Robust accuracy under AutoAttack standard, or ``None`` when autoattack is not installed."""
    try:
        from autoattack import AutoAttack
    except ImportError:
        return None
    adversary = AutoAttack(model, norm=norm, eps=eps, version="standard")
    x_adv = adversary.run_standard_evaluation(x, y, bs=batch_size)
    with torch.no_grad():
        ok = sum(int((model(x_adv[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                 for i in range(0, len(y), batch_size))
    return ok / len(y)


def evaluate_checkpoint(args) -> dict:
    ck = load_checkpoint(args.checkpoint)
    saved = ck["args"]
    pick = lambda k, default=None: getattr(args, k) if getattr(args, k, None) is not None else saved.get(k, default)  # noqa: E731
    model_name = pick("model")
    if model_name is None:
        raise ValueError("this checkpoint does not say its architecture: pass --model "
                         "(preact18, wrn34-10, wrn28-10, small-cnn)")
    data = pick("data", "digits")
    norm = pick("norm", "Linf")
    eps = pick("eps", 8 / 255 if norm == "Linf" else 0.5)
    alpha = getattr(args, "alpha", None) or (saved.get("alpha") if getattr(args, "eps", None) is None else None) \
        or eps / 4
    image_size = pick("image_size")
    if image_size is None and data != "cifar10":
        image_size = 16 if model_name == "small-cnn" else 32
    ds = load_dataset(data, pick("data_dir"), image_size)
    width = pick("width")
    model = build_model(model_name, ck["num_classes"] or ds.num_classes, ds.in_channels, width)
    model.load_state_dict(ck["model"])
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available())
                          else ("cpu" if args.device == "auto" else args.device))
    model.to(device).eval()
    torch.manual_seed(args.seed)
    res = {"checkpoint": args.checkpoint, "epoch": ck["epoch"], "model": model_name, "data": data,
           "norm": norm, "eps": eps, "alpha": alpha, "n": None}
    t0 = time.perf_counter()
    clean = None
    for steps in args.steps:
        r = evaluate_split(model, ds.test, args.batch_size, eps, alpha, steps, norm, device=device, amp=args.amp,
                           limit=args.samples)
        res["n"] = r["n"]
        clean = r["clean_acc"]
        res[f"pgd{steps}_acc"] = r["robust_acc"]
    if clean is None:
        clean = evaluate_split(model, ds.test, args.batch_size, eps, alpha, 0, norm, device=device,
                               limit=args.samples)["clean_acc"]
    res["clean_acc"] = clean
    if args.no_autoattack:
        res["autoattack_acc"] = None
        res["autoattack"] = "skipped (--no-autoattack)"
    else:
        split = ds.test.subset(args.samples)
        x, y = to_float(split.x).to(device), split.y.to(device)
        aa = autoattack_accuracy(model, x, y, norm, eps, args.batch_size)
        res["autoattack_acc"] = aa
        res["autoattack"] = "standard" if aa is not None else AUTOATTACK_HINT
    res["time_s"] = time.perf_counter() - t0
    return res


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = evaluate_checkpoint(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"awpfast.evaluate: error: {e}", file=sys.stderr)
        return 2
    print(f"{res['checkpoint']} (epoch {res['epoch']}): {res['model']} on {res['data']}, {res['n']} test images, "
          f"{res['norm']} eps={res['eps']:.4g} alpha={res['alpha']:.4g}")
    print(f"  clean        {100 * res['clean_acc']:6.2f} %")
    for s in args.steps:
        print(f"  PGD-{s:<8d} {100 * res[f'pgd{s}_acc']:6.2f} %")
    if res["autoattack_acc"] is not None:
        print(f"  AutoAttack   {100 * res['autoattack_acc']:6.2f} %")
    else:
        print(f"  {res['autoattack']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
