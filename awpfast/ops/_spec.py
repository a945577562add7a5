"""The seam's ops, stated once: the table every layer of ``awpfast.ops`` is derived from.

``OPS`` lists each op with its arguments (name, kind, default, doc), which of them it writes,
what it returns and what it does. From it come the public functions of ``awpfast.ops`` (their
signatures, docstrings and validation, and the split into (device, dtype) groups), the
``torch.library`` custom ops of the kernel backends (``_library.py``: schema, mutated
arguments, fake implementation) and the group functions those backends export. The reference
and foreach backends, and the kernel launchers of triton and native, implement each op at the
group level (below).

Three levels, one argument order (the public one without ``backend``):

* public (``awpfast.ops.<op>``): lists of tensors on any devices and dtypes; floats given as one
  number or one per tensor; optional lists as None.
* group (``<backend module>.<op>``): one (device, dtype) group, validated: optional lists None or
  a list; per-tensor floats (``FLOATS``) a list of floats; ``SCALES`` a list of floats or a 1-D
  float tensor on the device (one value per tensor); ``NORMS`` None or a pair of 1-D float
  tensors; directions and other ``cast`` lists already in the group's dtype.
* custom op (``awpfast::<backend>_<op>``, the kernel backends): optional lists as empty lists;
  ``SCALES`` as two arguments (``scales``: floats, empty when ``scale_t`` is given; ``scale_t``:
  a contiguous float64 tensor on the device or None); ``NORMS`` as two optional contiguous
  float64 tensors (``dnorms``, ``wnorms``).

Imports nothing but the standard library: ``awpfast.ops`` and ``_library`` build on it.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

# --------------------------------------------------------------------------- argument kinds
TENSORS = "tensors"          # a list of tensors, one per tensor of the lead (the first TENSORS argument)
OPT_TENSORS = "opt_tensors"  # an optional list of tensors (None: absent), paired with the lead
FLOATS = "floats"            # a float >= 0 or one per tensor (also a tensor of them); group: a list
SCALES = "scales"            # a float, one per tensor, or a float tensor read on the device (no host sync)
SCALAR = "scalar"            # one number (``check`` validates and converts it)
FLAG = "flag"                # True or False
CHOICE = "choice"            # one of ``choices``
TENSOR = "tensor"            # one tensor, paired with the first TENSOR argument (same shape, dtype, device)
NORMS = "norms"              # None or a pair (direction_norms, param_norms) of 1-D float tensors

# what an op returns
NONE = "none"                # nothing
PER_TENSOR = "per_tensor"    # a 1-D norm per tensor in input order, float32 (float64 if a group is float64)
SUM = "sum"                  # a 0-dim sum over all groups, float32 (float64 if a group is float64)
FIRST = "first"              # the first argument (the custom op returns nothing)

REQUIRED = object()


# --------------------------------------------------------------------------- scalar checks
def as_float(name: str, v):
    return float(v)


def finite_nonneg(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not (0.0 <= v < float("inf")):
        raise ValueError(f"{name} must be finite and >= 0, got {v}")
    return v


def nonneg(name: str, v) -> float:
    if not (v >= 0):
        raise ValueError(f"{name} must be >= 0, got {v}")
    return float(v)


def positive_or_none(name: str, v) -> Optional[float]:
    if v is None:
        return None
    if not (float(v) > 0 and float(v) < math.inf):
        raise ValueError(f"{name} must be a finite number > 0 (or None), got {v!r}")
    return float(v)


@dataclass(frozen=True)
class Arg:
    """One argument of a seam op. ``group``: its name at the group and custom-op levels when
    that differs (a per-tensor list: ``gamma`` -> ``gammas``)."""
    name: str
    kind: str
    doc: str
    default: object = REQUIRED
    keyword: bool = False                 # keyword-only in the public function
    mutates: bool = False                 # written by the op
    cast: bool = False                    # a tensor list cast to the group's dtype (else its dtype must match)
    check: Optional[Callable] = None      # SCALAR: (name, value) -> validated value
    choices: Tuple[str, ...] = ()         # CHOICE
    group: str = ""

    @property
    def group_name(self) -> str:
        return self.group or self.name


@dataclass(frozen=True)
class Op:
    name: str
    args: Tuple[Arg, ...]
    returns: str
    doc: str                              # the semantics (reST, as in the module docstring)
    returns_doc: str = ""
    check: Optional[Callable] = None      # (values by name) -> None: checks across arguments

    def arg(self, name: str) -> Arg:
        return next(a for a in self.args if a.name == name)


def _pgd_check(v) -> None:
    if v["norm"] == "L2" and v["x"].dim() < 1:
        raise ValueError("pgd_step_: L2 needs a batch dimension")


_NORMS_RETURN = ("The direction norms (as ``norms``): 1-D, one per tensor in input order, float32 "
                 "(float64 when a float64 tensor is present). No host sync.")
_SCALE_DOC = ("a float, one float per tensor, or a float tensor on the params' device (0-dim for all, "
              "or 1-D with one value per tensor; read on the device, no host sync)")
_PARAMS = Arg("params", TENSORS, "the weights, written in place", mutates=True)
_DIRS = Arg("directions", TENSORS, "one direction per tensor, same shapes (cast to each tensor's dtype; "
            "not modified)", cast=True)

OPS = (
    Op("norms", (Arg("tensors", TENSORS, "floating-point tensors (any shapes, devices, dtypes)"),),
       PER_TENSOR,
       "Frobenius norm of each whole tensor; fp32-or-wider accumulation.",
       "1-D, one norm per tensor in input order, float32 (float64 when a float64 tensor is present). "
       "No host sync."),
    Op("perturb_", (
        _PARAMS, _DIRS,
        Arg("gamma", FLOATS, "relative size ``||v_i|| / ||w_i||``: one float or one per tensor (>= 0)",
            group="gammas"),
        Arg("eps", SCALAR, "added to the direction norm (the reference's 1e-20)", default=1e-20, check=as_float),
        Arg("backups", OPT_TENSORS, "receive a bit-exact copy of ``params`` before the write", default=None,
            mutates=True),
        Arg("deltas", OPT_TENSORS, "receive ``v_i``", default=None, mutates=True)),
       PER_TENSOR,
       "The AWP perturbation, in place. For each i: if ``backups`` is given, ``backups[i] <- params[i]`` "
       "(bit-exact); ``v_i = gamma_i * ||params[i]|| / (||directions[i]|| + eps) * directions[i]`` (norms of "
       "whole tensors); if ``deltas`` is given, ``deltas[i] <- v_i``; ``params[i] += v_i``. The per-tensor "
       "scales are computed on the device.",
       _NORMS_RETURN),
    Op("restore_", (_PARAMS, Arg("backups", TENSORS, "tensors of the same shapes, devices and dtypes")),
       NONE, "``params[i] <- backups[i]`` (bit-exact), one call for every tensor."),
    Op("unperturb_", (_PARAMS, Arg("deltas", TENSORS, "the perturbations ``v_i`` (e.g. written by "
                                   "``perturb_(..., deltas=...)``)")),
       NONE, "``params[i] -= deltas[i]``: the reference restore order (remove v after the optimizer stepped "
       "at ``w + v``; not bit-exact, unlike ``restore_``)."),
    Op("ascent_step_", (
        _PARAMS,
        Arg("backups", TENSORS, "the unperturbed weights ``w`` (read only)"),
        Arg("directions", TENSORS, "the new ascent directions ``d`` (read only; cast to each tensor's dtype)",
            cast=True),
        Arg("step_size", FLOATS, "relative step size: one float or one per tensor (>= 0)", group="step_sizes"),
        Arg("gamma", FLOATS, "relative radius of the ball: one float or one per tensor (>= 0)", group="gammas"),
        Arg("eps", SCALAR, "added to the direction norm", default=1e-20, check=as_float)),
       PER_TENSOR,
       "One later step of multi-step AWP, in place, around the base weights ``w = backups``: "
       "``v = params - w``; ``v += step_size_i * ||w|| / (||d|| + eps) * d``; "
       "``v <- v * min(1, gamma_i * ||w|| / ||v||)``; ``params <- w + v``.",
       _NORMS_RETURN),
    Op("project_", (_PARAMS, Arg("backups", TENSORS, "the unperturbed weights (read only)"),
                    Arg("gamma", FLOATS, "relative radius: one float or one per tensor (>= 0)", group="gammas")),
       NONE, "Project the perturbation onto the ball, in place: with ``v = params - backups``, "
       "``params <- backups + v * min(1, gamma_i * ||backups|| / ||v||)``."),
    Op("pgd_step_", (
        Arg("x_adv", TENSOR, "the adversarial batch (modified in place)", mutates=True),
        Arg("grad", TENSOR, "the loss gradient with respect to ``x_adv``"),
        Arg("x", TENSOR, "the clean batch (centre of the ball); all three share shape, dtype and device"),
        Arg("alpha", SCALAR, "step size (>= 0)", check=nonneg),
        Arg("eps", SCALAR, "radius (>= 0)", check=nonneg),
        Arg("norm", CHOICE, "``\"Linf\"`` or ``\"L2\"``", default="Linf", choices=("Linf", "L2"))),
       FIRST,
       "One PGD step in place on the adversarial batch (one fused launch on the GPU backends), in the order "
       "of the established implementations. L-inf: ``x_adv <- clamp(x + clamp(x_adv + alpha * sign(grad) - "
       "x, -eps, eps), 0, 1)``. L2: ``x_adv + alpha * grad / (||grad|| + 1e-10)`` per sample, the difference "
       "to ``x`` rescaled into the eps-ball, then clamped to [0, 1].",
       "``x_adv``.", check=_pgd_check),
    Op("add_scaled_", (
        _PARAMS, _DIRS,
        Arg("scale", SCALES, _SCALE_DOC, group="scales"),
        Arg("clip", SCALAR, "clamp the directions to [-clip, clip] first (None: no clamp)", default=None,
            keyword=True, check=positive_or_none),
        Arg("base", OPT_TENSORS, "start from these tensors instead of ``params`` (e.g. the unperturbed weights)",
            default=None, keyword=True),
        Arg("backups", OPT_TENSORS, "receive a bit-exact copy of ``params`` before the write", default=None,
            keyword=True, mutates=True),
        Arg("deltas", OPT_TENSORS, "receive ``v_i``", default=None, keyword=True, mutates=True)),
       NONE,
       "The general \"apply\": for each i, ``d = clamp(directions[i], -clip, clip)`` (no clamp when ``clip`` "
       "is None), ``v_i = scale_i * d``; if ``backups`` is given, ``backups[i] <- params[i]`` (bit-exact, "
       "before the write); if ``deltas`` is given, ``deltas[i] <- v_i``; ``params[i] <- (base[i] if base "
       "else params[i]) + v_i``. Used where the per-tensor scale comes from elsewhere (norms all-reduced "
       "across processes, one global norm, a landscape coordinate, a fixed step); plain SAM's apply."),
    Op("global_sqnorm", (
        Arg("tensors", TENSORS, "floating-point tensors (any shapes, devices, dtypes)"),
        Arg("weights", OPT_TENSORS, "one weight per tensor (cast to each tensor's dtype); None: ``T_i = 1``",
            default=None, keyword=True, cast=True),
        Arg("eta", SCALAR, "added to ``|weights[i]|`` (finite, >= 0)", default=0.0, keyword=True,
            check=finite_nonneg)),
       SUM,
       "``sum_i ||T_i * tensors[i]||^2`` with ``T_i = |weights[i]| + eta`` elementwise (``T_i = 1`` without "
       "``weights``), fp32-or-wider accumulation, one reduction per (device, dtype) group. Its square root is "
       "SAM's global gradient norm (``weights=params``: ASAM's ``||T g||``). Under FSDP2 the caller "
       "all-reduces it (a sum of local partial sums) before the square root.",
       "A 0-dim tensor on ``tensors[0]``'s device, float32 (float64 if any input is float64). No host sync."),
    Op("asam_apply_", (
        _PARAMS, _DIRS,
        Arg("scale", SCALES, _SCALE_DOC, group="scales"),
        Arg("eta", SCALAR, "added to ``|params[i]|`` (finite, >= 0)", default=0.0, keyword=True,
            check=finite_nonneg),
        Arg("backups", OPT_TENSORS, "receive a bit-exact copy of ``params`` before the write", default=None,
            keyword=True, mutates=True)),
       NONE,
       "ASAM's apply: ``T = |params[i]| + eta`` taken before the write; ``backups[i] <- params[i]`` "
       "(bit-exact); ``params[i] += scale_i * T^2 * directions[i]``."),
    Op("box_perturb_", (
        _PARAMS, _DIRS,
        Arg("adv_lr", FLOATS, "step size: one float or one per tensor (>= 0)", group="adv_lrs"),
        Arg("adv_eps", FLOATS, "relative half-width of the box: one float or one per tensor (>= 0)",
            group="adv_epss"),
        Arg("origins", TENSORS, "the box centres (written when ``first``)", mutates=True),
        Arg("first", FLAG, "the first step: copy ``params`` into ``origins``", keyword=True),
        Arg("eps", SCALAR, "added to both norms (finite, >= 0)", default=1e-6, keyword=True, check=finite_nonneg),
        Arg("norms", NORMS, "``(direction_norms, param_norms)``, 1-D float tensors used instead of the local "
            "norms (global norms of FSDP2 shards)", default=None, keyword=True)),
       PER_TENSOR,
       "Box AWP's clamped ascent step: if ``first``, ``origins[i] <- params[i]`` (bit-exact). Per tensor, "
       "``gn = ||d||``, ``wn = ||p||`` (the current ``p``); if ``gn == 0`` or ``gn`` is not finite, ``p`` is "
       "left unchanged; else ``p <- clamp(p + adv_lr*(wn + eps)/(gn + eps)*d, o - adv_eps*|o|, "
       "o + adv_eps*|o|)`` with ``o = origins[i]``.",
       _NORMS_RETURN),
)

SPEC = {op.name: op for op in OPS}
NAMES = tuple(SPEC)

BACKEND_DOC = ("``\"reference\"``, ``\"foreach\"``, ``\"triton\"``, ``\"native\"`` or None (the "
               "``AWPFAST_BACKEND`` environment variable, else the best for each device)")


# --------------------------------------------------------------------------- rendering
def public_signature(op: Op) -> str:
    parts, star = [], False
    for a in op.args:
        if a.keyword and not star:
            parts.append("*")
            star = True
        parts.append(a.name if a.default is REQUIRED else f"{a.name}={a.default!r}")
    return f"{op.name}({', '.join(parts)})"


def group_signature(op: Op) -> str:
    ret = {NONE: "None", FIRST: "None", PER_TENSOR: "norms", SUM: "0-dim tensor"}[op.returns]
    return f"{op.name}({', '.join(a.group_name for a in op.args)}) -> {ret}"


def _fill(text: str, first: str, rest: str) -> str:
    return textwrap.fill(text, 92, initial_indent=first, subsequent_indent=rest)


def docstring(op: Op) -> str:
    """The public function's docstring."""
    lines = [_fill(op.doc, "", ""), "", "Args:"]
    lines += [_fill(f"{a.name}: {a.doc}.", "    ", "        ") for a in op.args]
    lines.append(_fill(f"backend: {BACKEND_DOC}.", "    ", "        "))
    if op.returns_doc:
        lines += ["", "Returns:", _fill(op.returns_doc, "    ", "    ")]
    return "\n".join(lines)


def render(indent: str = "    ") -> str:
    """The ops of the table as reST (the module docstring of ``awpfast.ops``)."""
    out = []
    for op in OPS:
        out.append(f"``{public_signature(op)}``")
        text = op.doc + (f" Returns: {op.returns_doc}" if op.returns_doc else "")
        out.append(_fill(text, indent, indent))
    out += ["", "Group level (what a backend module implements, one function per op):", ""]
    out += [f"{indent}``{group_signature(op)}``" for op in OPS]
    return "\n".join(out)
