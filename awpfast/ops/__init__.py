"""The seam: a small set of multi-tensor ops that every awpfast backend implements.

Public functions here take whole lists of tensors, validate them, split them into groups
of one (device, dtype), pick a backend per group and call it once per group. Everything
above the seam (the optimizer wrapper, the attacks) is backend-agnostic.

Ops (``*_`` ops mutate their first argument in place):

``norms(tensors)``
    Frobenius norm of each whole tensor; float32 (float64 for float64 inputs), 1-D, in
    input order, fp32-or-wider accumulation.
``perturb_(params, directions, gamma, eps=1e-20, backups=None, deltas=None)``
    For each i: if ``backups`` is given, ``backups[i] <- params[i]`` (bit-exact);
    ``v_i = gamma_i * ||params[i]|| / (||directions[i]|| + eps) * directions[i]``;
    if ``deltas`` is given, ``deltas[i] <- v_i``; ``params[i] += v_i``.
    ``gamma`` is a float or one float per tensor. Returns the direction norms (as ``norms``).
``restore_(params, backups)``
    ``params[i] <- backups[i]`` (bit-exact).
``unperturb_(params, deltas)``
    ``params[i] -= deltas[i]`` (the reference order: remove v after the step).
``ascent_step_(params, backups, directions, step_size, gamma, eps=1e-20)``
    One multi-step AWP ascent step around the base weights ``w = backups``:
    ``v = params - w``; ``v += step_size_i * ||w|| / (||d|| + eps) * d``;
    ``v <- v * min(1, gamma_i * ||w|| / ||v||)``; ``params <- w + v``. Returns direction norms.
``project_(params, backups, gamma)``
    ``params <- w + v * min(1, gamma_i * ||w|| / ||v||)`` with ``v = params - w``.
``add_scaled_(params, directions, scale, *, clip=None, base=None, backups=None, deltas=None)``
    The general "apply": for each i, ``d = clamp(directions[i], -clip, clip)`` (no clamp
    when ``clip`` is None), ``v_i = scale_i * d``; if ``backups`` is given,
    ``backups[i] <- params[i]`` (bit-exact, before the write); if ``deltas`` is given,
    ``deltas[i] <- v_i``; ``params[i] <- (base[i] if base else params[i]) + v_i``.
    ``scale`` is a float, one float per tensor, or a float tensor on the params' device
    (0-dim for all, or one value per tensor) read on the device: no host sync. Used where
    the per-tensor scale comes from elsewhere (norms all-reduced across processes, one
    global norm, a landscape coordinate, a fixed step).
``pgd_step_(x_adv, grad, x, alpha, eps, norm="Linf")``
    One PGD step in place on the adversarial batch, in the order of the established
    implementations (sign/normalized step, projection onto the eps-ball around ``x``,
    clamp to [0, 1]). ``norm="L2"`` normalizes per sample (``||g|| + 1e-10``).

The rest of the weight-perturbation family (SAM, ASAM, Box AWP) adds three ops:

``global_sqnorm(tensors, *, weights=None, eta=0.0)``
    ``sum_i ||T_i * tensors[i]||^2`` with ``T_i = |weights[i]| + eta`` elementwise (``T_i = 1``
    without ``weights``): one 0-dim tensor, float32 (float64 if any input is float64) on
    ``tensors[0]``'s device, fp32-or-wider accumulation, one reduction per (device, dtype)
    group, no host sync. Its square root is SAM's global gradient norm (``weights=params``:
    ASAM's ``||T g||``). Under FSDP2 the caller all-reduces it (a sum of local partial sums)
    before the square root.
``asam_apply_(params, directions, scale, *, eta=0.0, backups=None)``
    ``T = |params[i]| + eta`` taken before the write; ``backups[i] <- params[i]`` (bit-exact);
    ``params[i] += scale_i * T^2 * directions[i]``. ``scale`` as in ``add_scaled_`` (a float,
    one per tensor, or a device tensor: no host sync). Plain SAM's apply is ``add_scaled_``.
``box_perturb_(params, directions, adv_lr, adv_eps, origins, *, first, eps=1e-6, norms=None)``
    Box AWP: if ``first``, ``origins[i] <- params[i]`` (bit-exact). Per tensor, ``gn = ||d||``,
    ``wn = ||p||`` (the current ``p``); if ``gn == 0`` or ``gn`` is not finite, ``p`` is left
    unchanged; else ``p <- clamp(p + adv_lr*(wn + eps)/(gn + eps)*d, o - adv_eps*|o|,
    o + adv_eps*|o|)`` with ``o = origins[i]``. ``adv_lr``/``adv_eps``: a float or one per
    tensor. ``norms``: optional ``(direction_norms, param_norms)`` 1-D tensors used instead of
    the local ones (global norms of FSDP2 shards). Returns the direction norms. No host sync.

Backends: ``reference`` (per tensor, float64-capable: the oracle), ``foreach``
(``torch._foreach_*``), ``triton`` (fused kernels) and ``native`` (awpfast._C). The
backend is the ``backend=`` argument, else ``$AWPFAST_BACKEND`` (read at call time), else
the best one available for the tensors' device.

A backend module implements each op for one (device, dtype) group, with the arguments
already validated (optional lists as None, per-tensor floats as lists). ``add_scaled_`` and
the family ops are optional for the kernel backends (one without its own implementation
uses the foreach one); their group-level signatures:

``add_scaled_(params, directions, scales, clip, base, backups, deltas) -> None``
    ``scales``: a list of floats or a 1-D float tensor (one value per tensor).
``global_sqnorm(tensors, weights, eta) -> 0-dim tensor``
    float32 (float64 for float64 groups); ``weights``, when given, are already cast to the
    group dtype.
``asam_apply_(params, directions, scales, eta, backups) -> None``
    ``scales`` as for ``add_scaled_``.
``box_perturb_(params, directions, adv_lrs, adv_epss, origins, first, eps, norms) -> norms``
    ``adv_lrs`` / ``adv_epss``: lists of floats (one per tensor); ``norms``: None, or a pair
    ``(direction_norms, param_norms)`` of 1-D float tensors on the group's device to use
    instead of computing them (FSDP2: global norms of sharded tensors).
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional, Sequence, Union

import torch

from . import _util

__all__ = [
    "norms", "perturb_", "restore_", "unperturb_", "ascent_step_", "project_", "add_scaled_", "pgd_step_",
    "global_sqnorm", "asam_apply_", "box_perturb_",
    "BACKENDS", "available_backends", "get_backend", "group_indices",
]

from ..choices import BACKENDS  # noqa: E402  (the names, torch-free)
_MODULES = {name: f"awpfast.ops.{name}" for name in BACKENDS}
_loaded: dict = {}
_warned: set = set()

Floats = Union[float, Sequence[float]]


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


def group_indices(tensors: Sequence[torch.Tensor]) -> dict:
    """{(device, dtype): [indices]} in first-seen order."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


# --------------------------------------------------------------------------- validation
def _check_list(name: str, ts) -> list:
    if isinstance(ts, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors, got a single tensor; wrap it in [ ]")
    ts = list(ts)
    for i, t in enumerate(ts):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] is {type(t).__name__}, expected a torch.Tensor")
    return ts


def _check_pair(name_a: str, a: list, name_b: str, b: list, same_dtype: bool = True) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} tensors but {name_b} has {len(b)}; pass one per tensor")
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


def _check_optional(name_a: str, a: list, name_b: str, b, same_dtype: bool = True) -> Optional[list]:
    """An optional list argument ``b`` (None stays None), checked and paired with ``a``."""
    if b is None:
        return None
    b = _check_list(name_b, b)
    _check_pair(name_a, a, name_b, b, same_dtype)
    return b


def _float_list(name: str, v, n: int) -> list:
    """One float per tensor, from a single number or a sequence of ``n``."""
    vals = _util.floats(v, n)
    if len(vals) != n:
        raise ValueError(f"{name} has {len(vals)} values for {n} tensors; give one per tensor or a single float")
    return vals


def _floats(name: str, v: Floats, n: int) -> list:
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    vals = _float_list(name, v, n)
    for x in vals:
        if not (x >= 0.0) or x == float("inf"):
            raise ValueError(f"{name} must be finite and >= 0, got {x}")
    return vals


def _pick(lst, idx):
    return None if lst is None else [lst[i] for i in idx]


def _pick_as(lst, idx, dtype):
    """The group's tensors of ``lst``, cast to the group dtype where they differ."""
    return [lst[i] if lst[i].dtype == dtype else lst[i].to(dtype) for i in idx]


def _per_group(ps, backend, call, returns_norms=False):
    """``call(backend_module, indices, dtype)`` once per (device, dtype) group of ``ps``; with
    ``returns_norms`` the per-group norm vectors are reassembled in input order."""
    if not ps:
        return torch.empty(0) if returns_norms else None
    groups = group_indices(ps)
    parts = [call(get_backend(backend, dev, dt), idx, dt) for (dev, dt), idx in groups.items()]
    if not returns_norms:
        return None
    if len(parts) == 1:
        return parts[0]
    dev = ps[0].device
    dt = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    out = torch.empty(len(ps), dtype=dt, device=dev)
    for part, idx in zip(parts, groups.values()):
        out[torch.tensor(idx, device=dev)] = part.to(device=dev, dtype=dt)
    return out


# --------------------------------------------------------------------------- the ops
def norms(tensors, *, backend: Optional[str] = None) -> torch.Tensor:
    """Frobenius norm of each whole tensor.

    Args:
        tensors: a list of floating-point tensors (any shapes, devices, dtypes).
        backend: ``"reference"``, ``"foreach"``, ``"triton"``, ``"native"`` or None (the
            ``AWPFAST_BACKEND`` environment variable, else the best for each device).

    Returns:
        A 1-D tensor with one norm per tensor, in input order: float32 (float64 when a
        float64 tensor is present), with fp32-or-wider accumulation. No host sync.
    """
    ts = _check_list("tensors", tensors)
    return _per_group(ts, backend, lambda be, idx, dt: be.norms(_pick(ts, idx)), returns_norms=True)


def perturb_(params, directions, gamma: Floats, eps: float = 1e-20, backups=None, deltas=None,
             *, backend: Optional[str] = None) -> torch.Tensor:
    """The AWP perturbation, in place: ``params[i] += gamma_i * ||params[i]|| /
    (||directions[i]|| + eps) * directions[i]`` (norms of whole tensors).

    Args:
        params: the weights to perturb (modified in place).
        directions: one ascent direction per weight, same shapes (cast to each weight's
            dtype); not modified.
        gamma: relative size ``||v_i|| / ||w_i||``: one float, or one per tensor (>= 0).
        eps: added to the direction norm (the reference's 1e-20).
        backups: optional tensors receiving a bit-exact copy of ``params`` before the write.
        deltas: optional tensors receiving ``v_i``.
        backend: see ``norms``.

    Returns:
        The direction norms (as ``norms``). No host sync; the per-tensor scales are
        computed on the device.
    """
    ps = _check_list("params", params)
    ds = _check_list("directions", directions)
    _check_pair("params", ps, "directions", ds, same_dtype=False)
    backups = _check_optional("params", ps, "backups", backups)
    deltas = _check_optional("params", ps, "deltas", deltas)
    gs = _floats("gamma", gamma, len(ps))
    return _per_group(ps, backend, lambda be, idx, dt: be.perturb_(
        _pick(ps, idx), _pick_as(ds, idx, dt), _pick(gs, idx), float(eps), _pick(backups, idx),
        _pick(deltas, idx)), returns_norms=True)


def restore_(params, backups, *, backend: Optional[str] = None) -> None:
    """Copy ``backups[i]`` into ``params[i]`` (bit-exact), one call for every tensor.

    Args:
        params: tensors to overwrite in place.
        backups: tensors of the same shapes, devices and dtypes.
        backend: see ``norms``.
    """
    ps = _check_list("params", params)
    bs = _check_list("backups", backups)
    _check_pair("params", ps, "backups", bs)
    _per_group(ps, backend, lambda be, idx, dt: be.restore_(_pick(ps, idx), _pick(bs, idx)))


def unperturb_(params, deltas, *, backend: Optional[str] = None) -> None:
    """``params[i] -= deltas[i]`` in place: the reference restore order (remove v after the
    optimizer stepped at ``w + v``; not bit-exact, unlike ``restore_``).

    Args:
        params: tensors to modify in place.
        deltas: the perturbations ``v_i`` (e.g. written by ``perturb_(..., deltas=...)``).
        backend: see ``norms``.
    """
    ps = _check_list("params", params)
    vs = _check_list("deltas", deltas)
    _check_pair("params", ps, "deltas", vs)
    _per_group(ps, backend, lambda be, idx, dt: be.unperturb_(_pick(ps, idx), _pick(vs, idx)))


def ascent_step_(params, backups, directions, step_size: Floats, gamma: Floats, eps: float = 1e-20,
                 *, backend: Optional[str] = None) -> torch.Tensor:
    """One later step of multi-step AWP, in place, around the base weights ``w = backups``:
    ``v = params - w``; ``v += step_size_i * ||w|| / (||d|| + eps) * d``; then ``v`` is
    projected onto ``||v|| <= gamma_i ||w||`` and ``params <- w + v``.

    Args:
        params: the currently perturbed weights (modified in place).
        backups: the unperturbed weights ``w`` (read only).
        directions: the new ascent directions ``d`` (read only).
        step_size: relative step size: one float or one per tensor (>= 0).
        gamma: relative radius of the ball: one float or one per tensor (>= 0).
        eps: added to the direction norm.
        backend: see ``norms``.

    Returns:
        The direction norms (as ``norms``).
    """
    ps = _check_list("params", params)
    bs = _check_list("backups", backups)
    ds = _check_list("directions", directions)
    _check_pair("params", ps, "backups", bs)
    _check_pair("params", ps, "directions", ds, same_dtype=False)
    ss = _floats("step_size", step_size, len(ps))
    gs = _floats("gamma", gamma, len(ps))
    return _per_group(ps, backend, lambda be, idx, dt: be.ascent_step_(
        _pick(ps, idx), _pick(bs, idx), _pick_as(ds, idx, dt), _pick(ss, idx), _pick(gs, idx), float(eps)),
        returns_norms=True)


def project_(params, backups, gamma: Floats, *, backend: Optional[str] = None) -> None:
    """Project the perturbation onto the ball, in place: with ``v = params - backups``,
    ``params <- backups + v * min(1, gamma_i * ||backups|| / ||v||)``.

    Args:
        params: the perturbed weights (modified in place).
        backups: the unperturbed weights (read only).
        gamma: relative radius: one float or one per tensor (>= 0).
        backend: see ``norms``.
    """
    ps = _check_list("params", params)
    bs = _check_list("backups", backups)
    _check_pair("params", ps, "backups", bs)
    gs = _floats("gamma", gamma, len(ps))
    _per_group(ps, backend, lambda be, idx, dt: be.project_(_pick(ps, idx), _pick(bs, idx), _pick(gs, idx)))


def _op(be, name: str):
    """``be``'s implementation of op ``name``; backends that have no kernel for a newer op
    use the foreach implementation (same semantics, every device)."""
    fn = getattr(be, name, None)
    return fn if fn is not None else getattr(_import("foreach")[0], name)


def _scales(scale, n: int, device):
    """``scale`` as a float list or a 1-D float tensor with one value per tensor."""
    if isinstance(scale, torch.Tensor):
        if not scale.dtype.is_floating_point:
            raise TypeError(f"scale must be a floating-point tensor, got {scale.dtype}")
        if scale.dim() == 0:
            return scale.reshape(1).expand(n)
        if scale.dim() != 1 or scale.numel() != n:
            raise ValueError(f"scale has shape {tuple(scale.shape)} for {n} tensors; give a 0-dim tensor "
                             "or one value per tensor")
        return scale
    vals = _float_list("scale", scale, n)
    for x in vals:
        if x != x or abs(x) == float("inf"):
            raise ValueError(f"scale must be finite, got {x}")
    return vals


def _pick_scale(sc, idx, device):
    if isinstance(sc, torch.Tensor):
        part = sc[idx[0]:idx[-1] + 1] if idx == list(range(idx[0], idx[-1] + 1)) else sc[torch.tensor(idx, device=sc.device)]
        return part.to(device) if part.device != device else part
    return [sc[i] for i in idx]


def add_scaled_(params, directions, scale, *, clip: Optional[float] = None, base=None, backups=None,
                deltas=None, backend: Optional[str] = None) -> None:
    """``params[i] <- (base[i] or params[i]) + scale_i * clamp(directions[i], -clip, clip)``,
    writing the old ``params[i]`` to ``backups[i]`` and the added term to ``deltas[i]`` in
    the same pass.

    Args:
        params: tensors to write in place.
        directions: one direction per tensor (read only; cast to each tensor's dtype).
        scale: a float, one float per tensor, or a float tensor on the params' device
            (0-dim for all, or 1-D with one value per tensor; read on the device, no sync).
        clip: clamp the directions to [-clip, clip] first (None: no clamp).
        base: start from these tensors instead of ``params`` (e.g. the unperturbed weights).
        backups: receive a bit-exact copy of ``params`` before the write.
        deltas: receive ``scale_i * clamp(directions[i])``.
        backend: see ``norms`` (kernel backends without an own kernel use ``foreach``).
    """
    ps = _check_list("params", params)
    ds = _check_list("directions", directions)
    _check_pair("params", ps, "directions", ds, same_dtype=False)
    extra = {name: _check_optional("params", ps, name, lst)
             for name, lst in (("base", base), ("backups", backups), ("deltas", deltas))}
    if clip is not None and not (float(clip) > 0 and float(clip) < float("inf")):
        raise ValueError(f"clip must be a finite number > 0 (or None), got {clip!r}")
    sc = _scales(scale, len(ps), ps[0].device if ps else None)
    _per_group(ps, backend, lambda be, idx, dt: _op(be, "add_scaled_")(
        _pick(ps, idx), _pick_as(ds, idx, dt), _pick_scale(sc, idx, ps[idx[0]].device),
        None if clip is None else float(clip), _pick(extra["base"], idx), _pick(extra["backups"], idx),
        _pick(extra["deltas"], idx)))


def pgd_step_(x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, alpha: float, eps: float,
              norm: str = "Linf", *, backend: Optional[str] = None) -> torch.Tensor:
    """One PGD step on an adversarial batch, in place (one fused launch on GPU backends).

    L-inf: ``x_adv <- clamp(x + clamp(x_adv + alpha * sign(grad) - x, -eps, eps), 0, 1)``.
    L2: ``x_adv + alpha * grad / (||grad|| + 1e-10)`` per sample, the difference to ``x``
    rescaled into the eps-ball, then clamped to [0, 1].

    Args:
        x_adv: the adversarial batch (modified in place).
        grad: the loss gradient with respect to ``x_adv``.
        x: the clean batch (centre of the ball). All three share shape, dtype and device.
        alpha: step size (>= 0).
        eps: radius (>= 0).
        norm: ``"Linf"`` or ``"L2"``.
        backend: see ``norms``.

    Returns:
        ``x_adv``.
    """
    for name, t in (("x_adv", x_adv), ("grad", grad), ("x", x)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if x_adv.shape != x.shape or grad.shape != x.shape:
        raise ValueError(
            f"pgd_step_: x_adv {tuple(x_adv.shape)}, grad {tuple(grad.shape)} and x {tuple(x.shape)} "
            "must have the same shape")
    if x_adv.dtype != x.dtype or grad.dtype != x.dtype or x_adv.device != x.device or grad.device != x.device:
        raise ValueError("pgd_step_: x_adv, grad and x must share dtype and device")
    if norm not in ("Linf", "L2"):
        raise ValueError(f"pgd_step_: norm must be 'Linf' or 'L2', got {norm!r}")
    if not (alpha >= 0 and eps >= 0):
        raise ValueError(f"pgd_step_: alpha and eps must be >= 0, got alpha={alpha}, eps={eps}")
    if norm == "L2" and x.dim() < 1:
        raise ValueError("pgd_step_: L2 needs a batch dimension")
    get_backend(backend, x.device, x.dtype).pgd_step_(x_adv, grad, x, float(alpha), float(eps), norm)
    return x_adv


# --------------------------------------------------------------------------- the family ops (SAM, ASAM, Box AWP)


def _check_finite_nonneg(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not (0.0 <= v < float("inf")):
        raise ValueError(f"{name} must be finite and >= 0, got {v}")
    return v


def global_sqnorm(tensors, *, weights=None, eta: float = 0.0, backend: Optional[str] = None) -> torch.Tensor:
    """``sum_i ||T_i * tensors[i]||^2`` with ``T_i = |weights[i]| + eta`` (1 without weights):
    a 0-dim float32 (float64 if any input is float64) tensor on ``tensors[0]``'s device.
    One reduction per (device, dtype) group, no host sync (see the module docstring).
    ``backend``: a backend name, else ``$AWPFAST_BACKEND``, else the best for the device."""
    ts = _check_list("tensors", tensors)
    ws = _check_optional("tensors", ts, "weights", weights, same_dtype=False)
    eta = _check_finite_nonneg("eta", eta)
    if not ts:
        return torch.zeros((), dtype=torch.float32)
    dev = ts[0].device
    out_dt = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
    total = None
    for (gdev, gdt), idx in group_indices(ts).items():
        be = get_backend(backend, gdev, gdt)
        part = _op(be, "global_sqnorm")(_pick(ts, idx), None if ws is None else _pick_as(ws, idx, gdt), eta)
        part = part.to(device=dev, dtype=out_dt)
        total = part if total is None else total + part
    return total


def asam_apply_(params, directions, scale, *, eta: float = 0.0, backups=None,
                backend: Optional[str] = None) -> None:
    """ASAM's apply: ``T = |params[i]| + eta`` (before the write), ``backups[i] <- params[i]``,
    ``params[i] += scale_i * T^2 * directions[i]`` (see the module docstring). ``backend``: a
    backend name, else ``$AWPFAST_BACKEND``, else the best for the device (kernel backends without
    this op use the foreach implementation)."""
    ps = _check_list("params", params)
    ds = _check_list("directions", directions)
    _check_pair("params", ps, "directions", ds, same_dtype=False)
    backups = _check_optional("params", ps, "backups", backups)
    eta = _check_finite_nonneg("eta", eta)
    sc = _scales(scale, len(ps), ps[0].device if ps else None)
    _per_group(ps, backend, lambda be, idx, dt: _op(be, "asam_apply_")(
        _pick(ps, idx), _pick_as(ds, idx, dt), _pick_scale(sc, idx, ps[idx[0]].device), eta,
        _pick(backups, idx)))


def _pick_norms(norms, idx, device):
    if norms is None:
        return None
    return tuple(_pick_scale(n, idx, device) for n in norms)


def box_perturb_(params, directions, adv_lr: Floats, adv_eps: Floats, origins, *, first: bool,
                 eps: float = 1e-6, norms=None, backend: Optional[str] = None) -> torch.Tensor:
    """Box AWP's clamped ascent step (see the module docstring). Returns the direction norms
    (one per tensor, float32; float64 for float64 inputs). ``backend``: a backend name, else
    ``$AWPFAST_BACKEND``, else the best for the device (kernel backends without this op use the
    foreach implementation)."""
    ps = _check_list("params", params)
    ds = _check_list("directions", directions)
    os_ = _check_list("origins", origins)
    _check_pair("params", ps, "directions", ds, same_dtype=False)
    _check_pair("params", ps, "origins", os_)
    if not isinstance(first, bool):
        raise TypeError(f"first must be True or False, got {type(first).__name__}")
    lrs = _floats("adv_lr", adv_lr, len(ps))
    aes = _floats("adv_eps", adv_eps, len(ps))
    eps = _check_finite_nonneg("eps", eps)
    if norms is not None:
        if not (isinstance(norms, (tuple, list)) and len(norms) == 2
                and all(isinstance(n, torch.Tensor) and n.dim() == 1 and n.numel() == len(ps)
                        and n.dtype.is_floating_point for n in norms)):
            raise ValueError(f"norms must be a pair (direction_norms, param_norms) of 1-D float tensors with "
                             f"{len(ps)} values each, or None")
    return _per_group(ps, backend, lambda be, idx, dt: _op(be, "box_perturb_")(
        _pick(ps, idx), _pick_as(ds, idx, dt), _pick(lrs, idx), _pick(aes, idx), _pick(os_, idx), first, eps,
        _pick_norms(norms, idx, ps[idx[0]].device)), returns_norms=True)
