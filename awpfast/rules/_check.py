"""The argument checks the rules share (one-line ``ValueError`` s naming the argument and its range)."""
from __future__ import annotations

import numbers

__all__ = ["is_number", "check_nonneg", "check_gamma", "check_rho", "RHO_MAX"]

RHO_MAX = 100.0  # SAM's rho bound: a neighbourhood larger than this (in weight norm) is not a local one


def is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_nonneg(value, what: str) -> float:
    if not (is_number(value) and 0 <= float(value) < float("inf")):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}"
                         + (" (a string: pass a float)" if isinstance(value, str) else ""))
    return float(value)


def check_rho(rho, what: str) -> float:
    value = check_nonneg(rho, what)
    if value > RHO_MAX:
        raise ValueError(f"{what} must be <= {RHO_MAX:g} (SAM moves the weights by rho in norm: usual values are "
                         f"0.01-2, ASAM's up to 5), got {rho!r}")
    return value


def check_gamma(gamma, what: str) -> None:
    ok = is_number(gamma) and 0 <= float(gamma) <= 1
    if not ok:
        raise ValueError(f"{what} must be a finite number >= 0 and <= 1 (each layer's perturbation relative to its "
                         f"weights: 0 disables AWP, the paper uses 0.005-0.01; above 1 it swamps the weights), got "
                         f"{gamma!r}" + (" (a string: pass a float, e.g. 0.01)" if isinstance(gamma, str) else ""))
