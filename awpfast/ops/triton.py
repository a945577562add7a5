"""Triton backend: fused multi-tensor kernels for every seam op (see ``_triton_kernels``).

Per (device, dtype) group, whatever the number of tensors:

* ``norms``: 2 launches (per-chunk partial sums of squares; per-tensor finalize);
* ``perturb_``: 2 launches (partials of ||w||^2 and ||d||^2; one apply pass that derives
  each layer's scale on the device from the partials and writes backup, delta and the
  perturbed weight together) - no host sync, no ``.item()``;
* ``restore_`` / ``unperturb_``: 1 launch;
* ``ascent_step_``: 2 launches (||w||^2, ||d||^2, ||p-w||^2, <p-w, d> in one pass; then
  one apply pass with the projection factor); ``project_``: 2 launches;
* ``pgd_step_``: 1 launch for L-inf and 1 launch for L2 (one program per sample);
* ``add_scaled_`` / ``asam_apply_``: 1 launch (backup, delta and the write in one pass; a
  per-tensor scale tensor computed on the device is read by the kernel, no host sync);
* ``global_sqnorm``: 2 launches (per-chunk float64 partials; one program adds them up in a
  fixed order into the 0-dim result);
* ``box_perturb_``: 2 launches (partials of ||w||^2 and ||d||^2; one apply pass deriving
  each layer's scale and skip flag on the device, copying the origin and clamping), or the
  apply launch alone when the norms are given.

fp32, bf16 and fp16 are supported with fp32 math inside; ``supports()`` is False for
float64 so the seam falls back to ``foreach``. Every kernel sequence is a
``torch.library`` custom op (``awpfast::triton_*``, with ``mutates_args`` and a fake
implementation); the group functions call it while Dynamo traces, so ``torch.compile``
sees one opaque op (no graph break inside awpfast), and call the implementation directly
in eager mode (same kernels, without the dispatcher's overhead).

fp32 math for the elements; float64 for the sums of squares and the per-tensor scalars
(denormal-safe: a direction norm of 1e-25 is computed exactly, not flushed to 0).

Launch metadata (pointer tables, chunk tables, per-tensor float tables, scratch for the
partial sums) is built and cached by ``_triton_tables``, which also holds the rules for
CUDA-graph capture and for several streams; this module supplies the kernel that builds a
table inside a capture (``_device_table``).

On the CPU the kernels only run under the Triton interpreter: ``TRITON_INTERPRET=1``
must be in the environment before Triton (and this module) is imported.
"""
from __future__ import annotations

import itertools
import os

import torch

from ._library import SeamOps
from ._triton_tables import (  # noqa: F401  (clear_cache, _captured, _f64_bits: the backend's API, tests)
    _captured, _device_ctx, _f64_bits, _float_tables, _floats, _floats_table, _Layout, _layouts, _lock, _lookup,
    _ptr_tables, _tables, clear_cache)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401
    from . import _triton_kernels as K
    _IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - depends on the environment
    K = None
    _IMPORT_ERROR = f"triton could not be imported ({type(e).__name__}: {e}); pip install triton"

# Tunables. BLOCK: elements per inner step of a program; CHUNK: elements per program
# (a multiple of BLOCK); MAXK: most chunks per tensor (bigger tensors get longer chunks,
# bounding the partials each apply program re-sums); KB: partials summed per step.
# CHUNK = 32K elements gives WRN-34-10 (46 M weights) about 1.4 K programs, ~11 per H100 SM:
# enough loads in flight without a long tail. L2_BLOCK = 0: one block covers a whole sample
# row (up to 4096 elements, 8 warps), so each of the three sweeps of a CIFAR row is a single
# step; larger rows loop.
CONFIG = {"BLOCK": 1024, "CHUNK": 32768, "MAXK": 1024, "KB": 1024, "num_warps": 4,
          "PGD_BLOCK": 1024, "L2_BLOCK": 0}

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def available():
    if _IMPORT_ERROR is not None:
        return False, _IMPORT_ERROR
    if not _INTERPRET and not torch.cuda.is_available():
        return False, ("no CUDA device, and TRITON_INTERPRET=1 was not set before import "
                       "(needed to run the Triton kernels on the CPU interpreter)")
    return True, ""


def supports_device(device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return _IMPORT_ERROR is None
    if device.type == "cpu":
        return _IMPORT_ERROR is None and _INTERPRET
    return False


def supports(device, dtype) -> bool:
    return dtype in _SUPPORTED and supports_device(device)


def _use_interpreter() -> bool:
    """Test hook: switch an already imported backend to the Triton CPU interpreter.

    The supported way is ``TRITON_INTERPRET=1`` before import; this covers a test session
    in which another module imported this backend first. Re-decorates the kernels (Triton
    reads the flag when ``@triton.jit`` runs). Returns whether the interpreter is on."""
    global K, _INTERPRET
    if _IMPORT_ERROR is not None:
        return False
    if not _INTERPRET:
        import importlib
        os.environ["TRITON_INTERPRET"] = "1"
        K = importlib.reload(K)
        _INTERPRET = True
    return True


def set_config(**kw) -> dict:
    """Change tunables (tests use tiny chunks); returns the previous values."""
    old = dict(CONFIG)
    for k, v in kw.items():
        if k not in CONFIG:
            raise KeyError(f"unknown triton backend setting {k!r}; known: {sorted(CONFIG)}")
        CONFIG[k] = int(v)
    for k in ("BLOCK", "KB", "PGD_BLOCK", "L2_BLOCK"):
        if CONFIG[k] & (CONFIG[k] - 1):
            CONFIG.update(old)
            raise ValueError(f"{k} must be a power of two")
    if CONFIG["CHUNK"] % CONFIG["BLOCK"] or CONFIG["MAXK"] < 1:
        CONFIG.update(old)
        raise ValueError("CHUNK must be a multiple of BLOCK and MAXK >= 1")
    return old


# --------------------------------------------------------------------------- launch metadata
# Test hook: treat every call as if a CUDA graph were being captured (tables missing from
# the caches are then built by kernels and not cached, scratch is per call), so that the
# capture path runs on the CPU interpreter too.
SIMULATE_CAPTURE = False


class _Ctx:
    """Where one op call runs: device, current stream (raw handle) and whether that stream is
    being captured into a CUDA graph (or ``SIMULATE_CAPTURE``), and the capture-time table
    builder (``_device_table``) for ``_triton_tables``. Computed once per call (a few host
    microseconds)."""

    __slots__ = ("device", "cuda", "stream", "capturing", "device_table")

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            idx = device.index if device.index is not None else torch.cuda.current_device()
            self.stream = torch._C._cuda_getCurrentRawStream(idx)
            self.capturing = bool(torch.cuda.is_current_stream_capturing()) or SIMULATE_CAPTURE
        else:
            self.stream = 0
            self.capturing = SIMULATE_CAPTURE
        self.device_table = _device_table


def _device_table(values, ctx):
    """An int64 table built by kernels from their arguments (no host-to-device copy), for a
    call inside a CUDA-graph capture: the values become part of the graph and the memory comes
    from the graph's pool. Not cached."""
    t = torch.empty(max(len(values), 1), dtype=torch.int64, device=ctx.device)
    per = K.FILL_PER_LAUNCH
    for i in range(0, len(values), per):
        part = values[i:i + per]
        K.fill_i64_kernel[(1,)](t, i, len(part), *K.fill_args(part), num_warps=1)
    return t


class _Launch:
    """Everything one op call launches with: layout sizes, its table views and scratch."""

    __slots__ = ("T", "C", "tinfo", "ctab", "part")

    def __init__(self, tensors, ctx):
        sizes = tuple(map(torch.Tensor.numel, tensors))
        B, CH, MK = CONFIG["BLOCK"], CONFIG["CHUNK"], CONFIG["MAXK"]
        key = (ctx.device, sizes, B, CH, MK)
        with _lock:
            lay = _layouts.get(key)
            if lay is None:
                lay = _Layout(key, sizes, B, CH, MK)
                _layouts.put(key, lay)
        tab = _lookup(_ptr_tables, ("layout",) + key, lambda: lay.values, ctx)
        self.T, self.C = lay.T, lay.C
        self.tinfo = tab[: 4 * lay.T]
        self.ctab = tab[4 * lay.T:]
        self.part = lay.part(ctx)


def _setup(lead, *lists):
    """For one op call, inside ``_device_ctx``: the call context, the launch layout of ``lead``,
    the pointer tables of ``lists`` and whether they are all 16-byte aligned."""
    ctx = _Ctx(lead[0].device)
    lay = _Launch(lead, ctx)
    tabs, al = _tables(ctx, *lists)
    return ctx, lay, tabs, al


def _reduce(mode, tabs, proto, lay, aligned):
    """One ``mt_reduce_kernel`` launch; ``mode``: one of the kernels' ``R_*`` constants."""
    P = [t if t is not None else tabs[0] for t in tabs] + [tabs[0]] * (3 - len(tabs))
    K.mt_reduce_kernel[(lay.C,)](P[0], P[1], P[2], proto, lay.tinfo, lay.ctab, lay.part, lay.C,
                                 MODE=mode.value, BLOCK=CONFIG["BLOCK"], ALIGNED=aligned,
                                 num_warps=CONFIG["num_warps"])


def _apply(mode, tabs, proto, lay, aligned, s0=0.0, s1=0.0, t0=None, t1=None, eps=0.0, out=None):
    """One ``mt_apply_kernel`` launch; ``mode``: one of the kernels' ``A_*`` constants."""
    P = [t if t is not None else tabs[0] for t in tabs] + [tabs[0]] * (4 - len(tabs))
    has_b = len(tabs) > 2 and tabs[2] is not None
    has_d = len(tabs) > 3 and tabs[3] is not None
    per = t0 is not None or t1 is not None
    S0 = t0 if t0 is not None else lay.part
    S1 = t1 if t1 is not None else lay.part
    K.mt_apply_kernel[(lay.C,)](P[0], P[1], P[2], P[3], proto, lay.tinfo, lay.ctab, lay.part,
                                lay.C, S0, S1, float(s0), float(s1), float(eps),
                                out if out is not None else lay.part,
                                MODE=mode.value, PER_TENSOR=per, HAS_B=has_b, HAS_D=has_d,
                                BLOCK=CONFIG["BLOCK"], KB=CONFIG["KB"], ALIGNED=aligned,
                                num_warps=CONFIG["num_warps"])


# --------------------------------------------------------------------------- implementations
def _norms_impl(ts):
    dev = ts[0].device
    out = torch.empty(len(ts), dtype=torch.float32, device=dev)
    with _device_ctx(dev):
        ctx, lay, tabs, al = _setup(ts, ts)
        _reduce(K.R_NORM, tabs, ts[0], lay, al)
        K.mt_norms_finalize_kernel[(lay.T,)](lay.part, lay.tinfo, out, lay.C, KB=CONFIG["KB"])
    return out


def _perturb_impl(params, directions, gammas, eps, backups, deltas):
    dev = params[0].device
    out = torch.empty(len(params), dtype=torch.float32, device=dev)
    with _device_ctx(dev):
        ctx, lay, tabs, al = _setup(params, params, directions, backups, deltas)
        _reduce(K.R_PERTURB, tabs[:2], params[0], lay, al)
        g, gt = _floats(gammas, ctx)
        _apply(K.A_PERTURB, tabs, params[0], lay, al, s0=g, t0=gt, eps=eps, out=out)
    return out


def _restore_impl(params, backups):
    _copy_like_impl(K.A_RESTORE, params, backups)


def _unperturb_impl(params, deltas):
    _copy_like_impl(K.A_UNPERTURB, params, deltas)


def _copy_like_impl(mode, params, others):
    dev = params[0].device
    with _device_ctx(dev):
        ctx, lay, tabs, al = _setup(params, params, others)
        _apply(mode, tabs, params[0], lay, al)


def _ascent_impl(params, backups, directions, step_sizes, gammas, eps):
    dev = params[0].device
    out = torch.empty(len(params), dtype=torch.float32, device=dev)
    with _device_ctx(dev):
        ctx, lay, tabs, al = _setup(params, params, backups, directions)
        _reduce(K.R_ASCENT, tabs, params[0], lay, al)
        s, st = _floats(step_sizes, ctx)
        g, gt = _floats(gammas, ctx)
        if (st is None) != (gt is None):  # per-tensor for one means tables for both
            st, gt = _floats_table(step_sizes, ctx), _floats_table(gammas, ctx)
        _apply(K.A_ASCENT, tabs, params[0], lay, al, s0=s, s1=g, t0=st, t1=gt, eps=eps, out=out)
    return out


def _project_impl(params, backups, gammas):
    dev = params[0].device
    with _device_ctx(dev):
        ctx, lay, tabs, al = _setup(params, params, backups)
        _reduce(K.R_PROJECT, tabs, params[0], lay, al)
        g, gt = _floats(gammas, ctx)
        _apply(K.A_PROJECT, tabs, params[0], lay, al, s0=g, t0=gt)


def _pgd_impl(x_adv, grad, x, alpha, eps, norm):
    n = x.numel()
    if n == 0:
        return
    with _device_ctx(x.device):
        if norm == "Linf":
            B = CONFIG["PGD_BLOCK"]
            K.pgd_linf_kernel[(triton_cdiv(n, B),)](x_adv, grad, x, n, float(alpha), float(eps),
                                                    BLOCK=B, num_warps=4)
        else:
            rows = x.shape[0]
            row = n // rows
            B = CONFIG["L2_BLOCK"] or min(4096, max(128, 1 << (row - 1).bit_length()))
            K.pgd_l2_kernel[(rows,)](x_adv, grad, x, row, float(alpha), float(eps),
                                     BLOCK=B, num_warps=8 if B >= 2048 else 4)


def triton_cdiv(a, b):
    return -(-a // b)


def _family_apply(mode, tabs, proto, lay, aligned, s=(0.0, None), x1=(0.0, None), clip=None, eta=0.0, eps=0.0,
                  nd=None, nw=None, out=None, first=False):
    P = [t if t is not None else tabs[0] for t in tabs] + [tabs[0]] * (5 - len(tabs))
    has = [len(tabs) > k and tabs[k] is not None for k in range(5)]
    K.mt_family_apply_kernel[(lay.C,)](
        P[0], P[1], P[2], P[3], P[4], proto, lay.tinfo, lay.ctab, lay.part, lay.C,
        s[1] if s[1] is not None else lay.part, x1[1] if x1[1] is not None else lay.part,
        float(s[0]), float(x1[0]), float(clip or 0.0), float(eta), float(eps),
        nd if nd is not None else lay.part, nw if nw is not None else lay.part,
        out if out is not None else lay.part,
        MODE=mode.value, T0=s[1] is not None, T1=x1[1] is not None, HAS_B=has[2] and mode.value != K.F_BOX.value,
        HAS_D=has[3], HAS_BASE=has[4], CLIP=clip is not None, FIRST=bool(first), GIVEN=nd is not None,
        BLOCK=CONFIG["BLOCK"], KB=CONFIG["KB"], ALIGNED=aligned, num_warps=CONFIG["num_warps"])


def _scale_pair(scales, scale_t, ctx):
    """(scalar, float64 table or None) for the kernel: a device scale tensor as the table."""
    if scale_t is not None:
        return 0.0, scale_t
    return _floats(scales, ctx)


def _add_scaled_impl(params, directions, scales, scale_t, clip, base, backups, deltas):
    if not params:
        return
    dev = params[0].device
    with _device_ctx(dev):
        ctx, lay, tabs, al = _setup(params, params, directions, backups, deltas, base)
        _family_apply(K.F_ADD, tabs, params[0], lay, al, s=_scale_pair(scales, scale_t, ctx), clip=clip)


def _global_sqnorm_impl(tensors, weights, eta):
    dev = tensors[0].device
    out = torch.empty((), dtype=torch.float32, device=dev)
    with _device_ctx(dev):
        ctx, lay, tabs, al = _setup(tensors, tensors, weights)
        K.mt_sqnorm_kernel[(lay.C,)](tabs[0], tabs[1] if tabs[1] is not None else tabs[0], tensors[0],
                                     lay.tinfo, lay.ctab, lay.part, float(eta), WEIGHTED=tabs[1] is not None,
                                     BLOCK=CONFIG["BLOCK"], ALIGNED=al, num_warps=CONFIG["num_warps"])
        K.sum_partials_kernel[(1,)](lay.part, lay.C, out, KB=CONFIG["KB"])
    return out


def _asam_apply_impl(params, directions, scales, scale_t, eta, backups):
    if not params:
        return
    dev = params[0].device
    with _device_ctx(dev):
        ctx, lay, tabs, al = _setup(params, params, directions, backups)
        _family_apply(K.F_ASAM, tabs, params[0], lay, al, s=_scale_pair(scales, scale_t, ctx), eta=eta)


def _box_perturb_impl(params, directions, adv_lrs, adv_epss, origins, first, eps, dnorms, wnorms):
    dev = params[0].device
    out = torch.empty(len(params), dtype=torch.float32, device=dev)
    with _device_ctx(dev):
        ctx, lay, tabs, al = _setup(params, params, directions, origins)
        if dnorms is None:
            _reduce(K.R_PERTURB, tabs[:2], params[0], lay, al)
        _family_apply(K.F_BOX, tabs, params[0], lay, al, s=_floats(adv_lrs, ctx), x1=_floats(adv_epss, ctx),
                      eps=eps, nd=dnorms, nw=wnorms, out=out, first=first)
    return out


# --------------------------------------------------------------------------- validation
def _flat_kind(t):
    if t.is_contiguous():
        return "contiguous"
    for fmt in (torch.channels_last, torch.channels_last_3d):
        try:
            if t.is_contiguous(memory_format=fmt):
                return "dense"
        except RuntimeError:
            pass
    return None


def _check_layout(*named):
    """Every tensor must be one dense block of memory laid out like its partners.

    Contiguous tensors always qualify; channels-last tensors do when the tensors they are
    combined with have the same strides. Anything else gets a ValueError naming it."""
    first_name, first = named[0]
    if not torch.compiler.is_compiling() and all(map(torch.Tensor.is_contiguous, itertools.chain(
            first, *(lst for _, lst in named[1:])))):
        return  # the common case, in one pass at C speed
    for i, t in enumerate(first):
        kind = _flat_kind(t)
        if kind is None:
            raise ValueError(
                f"awpfast triton backend: {first_name}[{i}] (shape {tuple(t.shape)}, stride "
                f"{t.stride()}) is not contiguous; call .contiguous() on it first (the Triton "
                "kernels address every tensor as one flat block of memory)")
        for name, lst in named[1:]:
            u = lst[i]
            if u.is_contiguous() if kind == "contiguous" else u.stride() == t.stride():
                continue
            raise ValueError(
                f"awpfast triton backend: {name}[{i}] (shape {tuple(u.shape)}, stride {u.stride()}) "
                f"is not laid out like {first_name}[{i}] (stride {t.stride()}); call .contiguous() "
                f"on both (the Triton kernels address every tensor as one flat block of memory)")


# --------------------------------------------------------------------------- torch.library ops
# Every kernel sequence is a custom op ``awpfast::triton_<op>`` (see _library.py); the group
# functions check the layouts, then call it (while Dynamo traces) or the implementation.
_OPS = SeamOps("triton_", {
    "norms": _norms_impl, "perturb_": _perturb_impl, "restore_": _restore_impl,
    "unperturb_": _unperturb_impl, "ascent_step_": _ascent_impl, "project_": _project_impl,
    "pgd_step_": _pgd_impl, "add_scaled_": _add_scaled_impl, "global_sqnorm": _global_sqnorm_impl,
    "asam_apply_": _asam_apply_impl, "box_perturb_": _box_perturb_impl,
}, check=_check_layout, register=K is not None)

# --------------------------------------------------------------------------- the group functions
# ``norms``, ``perturb_``, ... ``box_perturb_``: one per op of the table (``_spec.NAMES``), each
# converting its arguments for the custom op above and calling it (see ``SeamOps.group``).
globals().update(_OPS.group_functions())
