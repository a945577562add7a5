"""``--recipe NAME``: the option values of the reference scripts (docs/recipes.md), and how they are
applied to a command line. Torch-free, like the rest of the configuration."""
from __future__ import annotations

import argparse
import math
from typing import List

from ..errors import UsageError

__all__ = ["RECIPES", "apply_recipe", "recipe_overrides"]


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
_RST_AWP_REFERENCE = {  # RST (Carmon et al. 2019, yaircarmon/semisup-adv robust_self_training.py) + TRADES-AWP
    "method": "trades", "beta": 6.0, "awp_gamma": 0.005, "awp_warmup": 10, "awp_steps": 1,
    "awp_restore": "after_step", "model": "wrn28-10", "data": "cifar10", "augment": "crop+flip", "pad_mode": "zeros",
    "input_norm": "none", "epochs": 200, "batch_size": 256, "lr": 0.1, "lr_schedule": "cosine", "momentum": 0.9,
    "nesterov": True, "weight_decay": 5e-4, "attack_steps": 10, "attack_bn": "eval", "eval_steps": 20,
    "eps": 0.031, "alpha": 0.007, "extra_fraction": 0.5,
    "steps_per_epoch": lambda a: math.ceil(50000 / a.batch_size),  # RST's "epoch": 50,000 images
}
_AT_RWP_REFERENCE = dict(  # ChaojianYu/Robust-Weight-Perturbation AT_AWP_RWP/train_cifar10.py: Rice et al.'s base
    _AT_REFERENCE, awp_rule="rwp", rwp_steps=10, rwp_lr=0.01, rwp_threshold=1.7)
RECIPES = {
    "at-awp-reference": _AT_REFERENCE,
    "at-rwp-reference": _AT_RWP_REFERENCE,
    "at-reference": dict(_AT_REFERENCE, awp_gamma=0.0),
    "trades-awp-reference": _TRADES_REFERENCE,
    "trades-reference": dict(_TRADES_REFERENCE, awp_gamma=0.0),
    "rst-awp-reference": _RST_AWP_REFERENCE,
    "rst-reference": dict(_RST_AWP_REFERENCE, awp_gamma=0.0),
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
