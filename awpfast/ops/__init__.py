"""The seam: a small set of multi-tensor ops that every awpfast backend implements.

Public functions here take whole lists of tensors, validate them, split them into groups
of one (device, dtype), pick a backend per group and call it once per group. Everything
above the seam (the optimizer wrapper, the attacks) is backend-agnostic.

Backends: ``reference`` (per tensor, float64-capable: the oracle), ``foreach``
(``torch._foreach_*``), ``triton`` (fused kernels) and ``native`` (awpfast._C). The
backend is the ``backend=`` argument, else ``$AWPFAST_BACKEND`` (read at call time), else
the best one available for the tensors' device. Every backend module implements every op
at the group level: one (device, dtype) group, the arguments already validated.

Each op is stated once, in the table of ``_spec.py``: its arguments, what it writes, what it
returns, what it does. The public functions here (signatures, docstrings, validation,
dispatch) and the kernel backends' ``torch.library`` custom ops (``_library.py``) are derived
from it. The table, rendered (``*_`` ops mutate their first argument in place):

"""
from __future__ import annotations

import importlib
import itertools
import linecache
import operator
import os
import warnings
from typing import Optional

import torch

from . import _spec, _util
from ._spec import (CHOICE, FIRST, FLAG, FLOATS, NORMS, OPT_TENSORS, PER_TENSOR, REQUIRED, SCALAR, SCALES, SUM, TENSOR,
                    TENSORS)

__all__ = list(_spec.NAMES) + ["BACKENDS", "available_backends", "get_backend", "group_indices"]

from ..choices import BACKENDS  # noqa: E402  (the names, torch-free)
_MODULES = {name: f"awpfast.ops.{name}" for name in BACKENDS}
_loaded: dict = {}
_warned: set = set()


def _import(name: str):
    """(module, ok, why) of a backend; cached after the first call (a plain dict lookup, so
    Dynamo traces it; the first import runs outside any compiled graph). The weight-perturbation
    wrappers import their backends when they are built (``PerturbState.refresh``), so a compiled
    training step never reaches ``_import_first``, which is kept out of Dynamo (a graph break
    when a compiled region calls it first)."""
    hit = _loaded.get(name)
    if hit is not None:
        return hit
    return _import_first(name)


# Kept out of compiled graphs. ``torch._disable_dynamo`` imports Dynamo only when the function
# is first called (``torch.compiler.disable`` imports it at decoration time: ~3 s on every
# ``import awpfast``, CLI ``--help`` and error paths included).
_no_dynamo = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable


@_no_dynamo
def _import_first(name: str):
    if name not in _MODULES:
        raise ValueError(
            f"unknown awpfast backend {name!r}; choose one of {', '.join(BACKENDS)} "
            "(or unset AWPFAST_BACKEND)")
    if name not in _loaded:
        try:
            mod = importlib.import_module(_MODULES[name])
            ok, why = mod.available()
        except ImportError as e:  # e.g. triton not installed
            ok, why, mod = False, str(e), None
        _loaded[name] = (mod, ok, why)
    return _loaded[name]


def available_backends() -> list:
    """Names of the backends that can run in this process."""
    return [n for n in BACKENDS if _import(n)[1]]


def _default_name(device: torch.device) -> str:
    if device.type == "cuda":
        for cand in ("triton", "native"):
            mod, ok, _ = _import(cand)
            if ok and mod.supports_device(device):
                return cand
        return "foreach"
    if device.type == "cpu":
        mod, ok, why = _import("native")
        if ok and mod.supports_device(device):
            return "native"
        if "native-missing" not in _warned:
            _warned.add("native-missing")
            warnings.warn(
                f"awpfast: the native CPU extension is not available ({why}); using the 'foreach' backend.",
                RuntimeWarning, stacklevel=4)
    return "foreach"


def get_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype):
    """The backend module for one (device, dtype) group.

    An explicit or environment-chosen backend that cannot handle this group (Triton and
    float64, say) falls back to ``foreach``; one that cannot run at all raises.
    """
    name = backend or os.environ.get("AWPFAST_BACKEND") or None
    if name is None:
        name = _default_name(device)
    mod, ok, why = _import(name)
    if not ok:
        raise RuntimeError(
            f"awpfast backend {name!r} is not available: {why}. Pick another backend "
            f"(available: {', '.join(available_backends())}) or install what it needs.")
    if not mod.supports(device, dtype):
        return _import("foreach")[0]
    return mod


# The seam's host time per call is a few passes over the tensor lists: in eager mode each pass
# is one ``map`` over an ``attrgetter`` (C speed); Dynamo cannot trace ``attrgetter``, so while
# it traces, the same tuples come from a comprehension.
_FIELDS = {f: operator.attrgetter(*f) for f in (("device", "dtype"), ("shape", "device", "dtype"),
                                               ("shape", "device"))}


def _each(fields: tuple, ts) -> list:
    """``[(t.<field>, ...) for t in ts]``."""
    if torch.compiler.is_compiling():
        return [tuple(getattr(t, f) for f in fields) for t in ts]
    return list(map(_FIELDS[fields], ts))


def _all_of_dtype(ts, dtype) -> bool:
    if torch.compiler.is_compiling():
        return all(t.dtype == dtype for t in ts)
    return all(map(operator.is_, map(operator.attrgetter("dtype"), ts), itertools.repeat(dtype)))


def group_indices(tensors: Sequence[torch.Tensor], _keys: Optional[list] = None) -> dict:
    """{(device, dtype): [indices]} in first-seen order. (``_keys``: the tensors' (shape, device,
    dtype) tuples when the caller has them already.)"""
    keys = _each(("device", "dtype"), tensors) if _keys is None else [k[1:] for k in _keys]
    if keys and keys.count(keys[0]) == len(keys):  # the common case: one group
        return {keys[0]: list(range(len(keys)))}
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return groups


# --------------------------------------------------------------------------- validation
def _check_list(name: str, ts) -> list:
    if isinstance(ts, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors, got a single tensor; wrap it in [ ]")
    ts = list(ts)
    if torch.compiler.is_compiling() or not all(map(isinstance, ts, itertools.repeat(torch.Tensor))):
        for i, t in enumerate(ts):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] is {type(t).__name__}, expected a torch.Tensor")
    return ts


def _check_pair(name_a: str, a: list, name_b: str, b: list, same_dtype: bool = True,
                a_keys: Optional[dict] = None) -> None:
    """``b`` pairs with ``a`` tensor by tensor. ``a_keys``: a memo of ``a``'s attribute tuples
    (by fields), shared by the checks of one call against the same ``a``."""
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} tensors but {name_b} has {len(b)}; pass one per tensor")
    fields = ("shape", "device", "dtype") if same_dtype else ("shape", "device")
    memo = {} if a_keys is None else a_keys
    if fields not in memo:
        memo[fields] = _each(fields, a)
    if memo[fields] == _each(fields, b):  # the common case: all match (one pass each)
        return
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(
                f"{name_a}[{i}] has shape {tuple(x.shape)} but {name_b}[{i}] has {tuple(y.shape)}; "
                "they must match element for element")
        if x.device != y.device:
            raise ValueError(f"{name_a}[{i}] is on {x.device} but {name_b}[{i}] on {y.device}; move them together")
        if same_dtype and x.dtype != y.dtype:
            raise ValueError(
                f"{name_a}[{i}] is {x.dtype} but {name_b}[{i}] is {y.dtype}; cast {name_b} to the "
                f"dtype of {name_a}")


def _check_tensor(op: str, name_a: str, a, name_b: str, b) -> None:
    """``b`` is a tensor of ``a``'s shape, dtype and device (one-tensor ops)."""
    if a.shape != b.shape:
        raise ValueError(f"{op}: {name_b} has shape {tuple(b.shape)} but {name_a} has {tuple(a.shape)}; "
                         "they must have the same shape")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"{op}: {name_b} is {b.dtype} on {b.device} but {name_a} is {a.dtype} on {a.device}; "
                         "they must share dtype and device")


def _float_list(name: str, v, n: int) -> list:
    """One float per tensor, from a single number or a sequence of ``n``."""
    vals = _util.floats(v, n)
    if len(vals) != n:
        raise ValueError(f"{name} has {len(vals)} values for {n} tensors; give one per tensor or a single float")
    return vals


def _floats(name: str, v, n: int) -> list:
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    vals = _float_list(name, v, n)
    for x in vals:
        if not (x >= 0.0) or x == float("inf"):
            raise ValueError(f"{name} must be finite and >= 0, got {x}")
    return vals


def _scales(name: str, scale, n: int):
    """``scale`` as a float list or a 1-D float tensor with one value per tensor."""
    if isinstance(scale, torch.Tensor):
        if not scale.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {scale.dtype}")
        if scale.dim() == 0:
            return scale.reshape(1).expand(n)
        if scale.dim() != 1 or scale.numel() != n:
            raise ValueError(f"{name} has shape {tuple(scale.shape)} for {n} tensors; give a 0-dim tensor "
                             "or one value per tensor")
        return scale
    vals = _float_list(name, scale, n)
    for x in vals:
        if x != x or abs(x) == float("inf"):
            raise ValueError(f"{name} must be finite, got {x}")
    return vals


def _check_norms(name: str, norms, n: int):
    if norms is not None and not (isinstance(norms, (tuple, list)) and len(norms) == 2
                                  and all(isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == n
                                          and t.dtype.is_floating_point for t in norms)):
        raise ValueError(f"{name} must be a pair (direction_norms, param_norms) of 1-D float tensors with "
                         f"{n} values each, or None")
    return norms


def _validate(op: _spec.Op, given: tuple, memo: Optional[dict] = None) -> dict:
    """The arguments of ``op`` (public values, in the table's order) checked and normalized:
    tensor lists as lists paired with the lead (the first argument), per-tensor floats as
    lists, scales as a list or a 1-D tensor, scalars through their check."""
    v = {a.name: x for a, x in zip(op.args, given)}
    lead = op.args[0].name
    memo = {} if memo is None else memo  # the lead's attribute tuples, fetched once for all its pairs
    for a in op.args:
        if a.kind == TENSORS:
            v[a.name] = _check_list(a.name, v[a.name])
        elif a.kind == TENSOR and not isinstance(v[a.name], torch.Tensor):
            raise TypeError(f"{a.name} must be a tensor, got {type(v[a.name]).__name__}")
    for a in op.args[1:]:
        if a.kind == TENSORS:
            _check_pair(lead, v[lead], a.name, v[a.name], same_dtype=not a.cast, a_keys=memo)
        elif a.kind == TENSOR:
            _check_tensor(op.name, lead, v[lead], a.name, v[a.name])
    for a in op.args:
        if a.kind == OPT_TENSORS and v[a.name] is not None:
            v[a.name] = _check_list(a.name, v[a.name])
            _check_pair(lead, v[lead], a.name, v[a.name], same_dtype=not a.cast, a_keys=memo)
    n = len(v[lead]) if op.args[0].kind == TENSORS else 1
    for a in op.args:
        x = v[a.name]
        if a.kind == FLOATS:
            v[a.name] = _floats(a.name, x, n)
        elif a.kind == SCALES:
            v[a.name] = _scales(a.name, x, n)
        elif a.kind == SCALAR:
            v[a.name] = a.check(a.name, x)
        elif a.kind == FLAG and not isinstance(x, bool):
            raise TypeError(f"{a.name} must be True or False, got {type(x).__name__}")
        elif a.kind == CHOICE and x not in a.choices:
            raise ValueError(f"{op.name}: {a.name} must be {' or '.join(map(repr, a.choices))}, got {x!r}")
        elif a.kind == NORMS:
            _check_norms(a.name, x, n)
    if op.check is not None:
        op.check(v)
    return v


# --------------------------------------------------------------------------- dispatch
# ``idx``: the group's tensor indices, or None when the group is every tensor (the common case:
# nothing to pick, the validated lists pass as they are).
def _pick(lst, idx):
    return lst if lst is None or idx is None else [lst[i] for i in idx]


def _pick_as(lst, idx, dtype):
    """The group's tensors of ``lst``, cast to the group dtype where they differ."""
    if lst is None:
        return None
    if idx is None:
        return lst if _all_of_dtype(lst, dtype) else [t if t.dtype == dtype else t.to(dtype) for t in lst]
    return [lst[i] if lst[i].dtype == dtype else lst[i].to(dtype) for i in idx]


def _pick_scale(sc, idx, device):
    if isinstance(sc, torch.Tensor):
        if idx is None:
            part = sc
        elif idx == list(range(idx[0], idx[-1] + 1)):
            part = sc[idx[0]:idx[-1] + 1]
        else:
            part = sc[torch.tensor(idx, device=sc.device)]
        return part.to(device) if part.device != device else part
    return _pick(sc, idx)


def _group_args(op: _spec.Op, v: dict, idx: Optional[list], dtype, device) -> list:
    """The group-level arguments of ``op`` for the tensors ``idx`` of one (device, dtype) group."""
    out = []
    for a in op.args:
        x = v[a.name]
        if a.kind in (TENSORS, OPT_TENSORS):
            x = _pick_as(x, idx, dtype) if a.cast else _pick(x, idx)
        elif a.kind == FLOATS:
            x = _pick(x, idx)
        elif a.kind == SCALES:
            x = _pick_scale(x, idx, device)
        elif a.kind == NORMS and x is not None:
            x = tuple(_pick_scale(t, idx, device) for t in x)
        out.append(x)
    return out


def _run(op: _spec.Op, backend: Optional[str], given: tuple):
    """Validate the arguments of ``op``, split its tensors into (device, dtype) groups, call the
    chosen backend's group function once per group and assemble the result (``op.returns``)."""
    memo: dict = {}
    v = _validate(op, given, memo)
    lead = v[op.args[0].name]
    if op.returns == FIRST:  # one batch: one group
        getattr(get_backend(backend, lead.device, lead.dtype), op.name)(*[v[a.name] for a in op.args])
        return lead
    if not lead:
        return torch.zeros((), dtype=torch.float32) if op.returns == SUM else \
            torch.empty(0) if op.returns == PER_TENSOR else None
    groups = group_indices(lead, memo.get(("shape", "device", "dtype")))
    one = len(groups) == 1
    parts = [getattr(get_backend(backend, dev, dt), op.name)(*_group_args(op, v, None if one else idx, dt, dev))
             for (dev, dt), idx in groups.items()]
    if op.returns == PER_TENSOR:
        return _in_order(parts, groups, lead)
    if op.returns == SUM:
        dev = lead[0].device
        out_dt = torch.float64 if any(dt == torch.float64 for _, dt in groups) else torch.float32
        total = None
        for part in parts:
            part = part.to(device=dev, dtype=out_dt)
            total = part if total is None else total + part
        return total
    return None


def _in_order(parts: list, groups: dict, lead: list) -> torch.Tensor:
    """The per-group norm vectors reassembled in input order."""
    if len(parts) == 1:
        return parts[0]
    dev = lead[0].device
    dt = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    out = torch.empty(len(lead), dtype=dt, device=dev)
    for part, idx in zip(parts, groups.values()):
        out[torch.tensor(idx, device=dev)] = part.to(device=dev, dtype=dt)
    return out


# --------------------------------------------------------------------------- the public functions
def _public(op: _spec.Op):
    """The public function of ``op``: its signature from the table (``backend`` keyword-only at
    the end), its docstring rendered from it, its body ``_run``. The source is generated and kept
    in ``linecache`` under a name inside this package, so tracebacks, ``inspect`` and Dynamo see it."""
    params, star, ns = [], False, {"_run": _run, "_op_spec": op}
    for i, a in enumerate(op.args):
        if a.keyword and not star:
            params.append("*")
            star = True
        if a.default is REQUIRED:
            params.append(a.name)
        else:
            ns[f"_default{i}"] = a.default
            params.append(f"{a.name}=_default{i}")
    params += ([] if star else ["*"]) + ["backend=None"]
    names = "".join(a.name + ", " for a in op.args)
    src = f"def {op.name}({', '.join(params)}):\n    return _run(_op_spec, backend, ({names}))\n"
    filename = os.path.join(os.path.dirname(__file__), f"<seam op {op.name}>")
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    exec(compile(src, filename, "exec"), ns)
    fn = ns[op.name]
    fn.__module__, fn.__qualname__, fn.__doc__ = __name__, op.name, _spec.docstring(op)
    return fn


for _o in _spec.OPS:
    globals()[_o.name] = _public(_o)
del _o
__doc__ += _spec.render() + "\n"
