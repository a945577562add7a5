"""Native backend: the fused C++ (``awpfast._C``) and CUDA (``awpfast._C_cuda``) kernels.

The extensions take no torch types: this module hands them data pointers, element counts,
a dtype code, the thread count (``torch.get_num_threads()``) and, on CUDA, a float64
workspace and the current stream. Tensors are used in place when every tensor of an
element-wise tuple is contiguous, or all share one dense layout (channels_last, say);
anything else goes through contiguous copies that are written back.

CPU: perturb is two passes (norms of w and d; then backup + apply), restore is a memcpy,
multi-phase ops run over cache-sized segments so that the later phase reads from cache;
reductions are per-chunk partials added in a fixed order, so the results are bitwise the
same for any thread count. CUDA: multi-tensor-apply kernels with the per-tensor scales
computed on the device (no host sync). See csrc/README.md.

Weight-perturbation family (SAM, ASAM, Box AWP): ``add_scaled_`` and ``asam_apply_`` are
one pass each (backup, delta and the write together; a per-tensor scale tensor is read by
the kernels from device memory); ``global_sqnorm`` is one reduction with per-chunk float64
partials added in a fixed order (one 0-dim result on the device); ``box_perturb_`` is a
norm pass and one apply pass (origin copy, scale, clamp against the origin), or the apply
pass alone when the norms are given.
"""
from __future__ import annotations

import itertools

import torch

from ._library import SeamOps
from ._util import acc_dtype

try:
    from awpfast import _C
    _C_ERR = ""
except ImportError as e:  # not built (pure-Python install, or a failed build)
    _C = None
    _C_ERR = (f"awpfast._C not built ({e}): this install was built without it (AWPFAST_NATIVE=0, or a "
              "source tree without csrc/) or it does not load here; reinstall from a complete source (pip install "
              "--no-build-isolation --force-reinstall --no-deps <sdist or checkout>), whose build says 'awpfast: "
              "the native extension awpfast._C was NOT built: <why>' when it leaves it out")

try:
    from awpfast import _C_cuda
    _CUDA_ERR = ""
except ImportError as e:
    _C_cuda = None
    _CUDA_ERR = f"awpfast._C_cuda not built ({e})"

_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_cuda_ok: dict = {}

# Bytes of the re-read streams per segment of the multi-phase CPU ops (perturb, project,
# ascent_step, pgd L2); None uses the extension's default. Exposed for the benchmarks.
SEGMENT_BYTES = None


def available():
    if _C is None:
        return False, _C_ERR
    return True, ""


def cuda_status(device=None):
    """(ok, reason) for the CUDA kernels on ``device``."""
    if _C_cuda is None:
        return False, _CUDA_ERR
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _cuda_ok:
        with torch.cuda.device(idx):
            why = _C_cuda.probe()
        _cuda_ok[idx] = (why == "", why)
    return _cuda_ok[idx]


def supports_device(device):
    device = torch.device(device)
    if device.type == "cpu":
        return _C is not None
    if device.type == "cuda":
        return cuda_status(device)[0]
    return False


def supports(device, dtype):
    return dtype in _CODES and supports_device(device)


# --------------------------------------------------------------------------- helpers
def _threads():
    return max(1, torch.get_num_threads())


def _format_contiguous(t):
    """Contiguous, or channels_last (4-D) / channels_last_3d (5-D) contiguous."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _prepare(lists, mutated):
    """Make every element-wise tuple usable as flat memory.

    ``lists``: lists of tensors of equal length (None entries allowed); ``mutated``: which
    of them the op writes. Returns (lists to pass, [(original, temporary)] to write back).
    """
    present = [ts for ts in lists if ts is not None]
    if all(map(torch.Tensor.is_contiguous, itertools.chain.from_iterable(present))):
        return lists, []  # the common case, in one pass at C speed
    bad = []
    for i, tup in enumerate(zip(*present)):
        if all(t.is_contiguous() for t in tup):
            continue
        s = tup[0].stride()
        if _format_contiguous(tup[0]) and all(t.stride() == s for t in tup[1:]):
            continue
        bad.append(i)
    if not bad:
        return lists, []
    out, back = [], []
    for k, ts in enumerate(lists):
        if ts is None:
            out.append(None)
            continue
        ts = list(ts)
        for i in bad:
            c = ts[i].contiguous()
            if c is not ts[i] and k in mutated:
                back.append((ts[i], c))
            ts[i] = c
        out.append(ts)
    return out, back


def _finish(back, mutated_lists):
    for orig, tmp in back:
        orig.copy_(tmp)
    ts = [t for lst in mutated_lists if lst is not None for t in lst]
    if ts:
        try:
            torch._C._increment_version(ts)
        except (AttributeError, TypeError):  # older torch: one tensor at a time
            for t in ts:
                torch.autograd.graph.increment_version(t)


def _ptrs(ts):
    return list(map(torch.Tensor.data_ptr, ts)) if ts is not None else []


def _numel(ts):
    return list(map(torch.Tensor.numel, ts))


def _seg():
    return _C.DEFAULT_SEGMENT_BYTES if SEGMENT_BYTES is None else int(SEGMENT_BYTES)


class _Cuda:
    """Device guard + current stream + workspace for one CUDA call."""

    def __init__(self, device):
        self.guard = torch.cuda.device(device)

    def __enter__(self):
        self.guard.__enter__()
        self.stream = torch.cuda.current_stream().cuda_stream
        return self

    def __exit__(self, *exc):
        return self.guard.__exit__(*exc)


def _ws(n, device):
    return torch.empty(max(int(n), 1), dtype=torch.float64, device=device)


# --------------------------------------------------------------------------- the ops
def _impl_norms(ts):
    ts = list(ts)
    dt, dev = ts[0].dtype, ts[0].device
    out = torch.empty(len(ts), dtype=acc_dtype(dt), device=dev)
    (ts,), _ = _prepare([ts], ())
    if dev.type == "cuda":
        with _Cuda(dev) as c:
            ws = _ws(_C_cuda.workspace_doubles(_numel(ts)), dev)
            _C_cuda.norms(_ptrs(ts), _numel(ts), _CODES[dt], out.data_ptr(), ws.data_ptr(), c.stream)
        return out
    _C.norms(_ptrs(ts), _numel(ts), _CODES[dt], out.data_ptr(), _threads())
    return out


def _impl_perturb_(params, directions, gammas, eps, backups, deltas):
    dt, dev = params[0].dtype, params[0].device
    backups, deltas = backups or None, deltas or None
    out = torch.empty(len(params), dtype=acc_dtype(dt), device=dev)
    (p, d, b, v), back = _prepare([params, directions, backups, deltas], (0, 2, 3))
    n = _numel(p)
    if dev.type == "cuda":
        with _Cuda(dev) as c:
            ws = _ws(_C_cuda.workspace_doubles(n), dev)
            _C_cuda.perturb(_ptrs(p), _ptrs(d), _ptrs(b), _ptrs(v), n, list(gammas), float(eps),
                            _CODES[dt], out.data_ptr(), ws.data_ptr(), c.stream)
    else:
        _C.perturb(_ptrs(p), _ptrs(d), _ptrs(b), _ptrs(v), n, list(gammas), float(eps), _CODES[dt],
                   out.data_ptr(), _threads(), _seg())
    _finish(back, (params, backups, deltas))
    return out


def _impl_binary(fn_name, params, other):
    """params <- op(params, other) over whole lists: restore (copy) and unperturb (subtract)."""
    dt, dev = params[0].dtype, params[0].device
    (p, o), back = _prepare([params, other], (0,))
    if dev.type == "cuda":
        with _Cuda(dev) as c:
            getattr(_C_cuda, fn_name)(_ptrs(p), _ptrs(o), _numel(p), _CODES[dt], c.stream)
    else:
        getattr(_C, fn_name)(_ptrs(p), _ptrs(o), _numel(p), _CODES[dt], _threads())
    _finish(back, (params,))


def _impl_restore_(params, backups):
    _impl_binary("restore", params, backups)


def _impl_unperturb_(params, deltas):
    _impl_binary("unperturb", params, deltas)


def _impl_ascent_step_(params, backups, directions, step_sizes, gammas, eps):
    dt, dev = params[0].dtype, params[0].device
    out = torch.empty(len(params), dtype=acc_dtype(dt), device=dev)
    (p, w, d), back = _prepare([params, backups, directions], (0,))
    n = _numel(p)
    if dev.type == "cuda":
        with _Cuda(dev) as c:
            ws = _ws(_C_cuda.workspace_doubles(n), dev)
            _C_cuda.ascent_step(_ptrs(p), _ptrs(w), _ptrs(d), n, list(step_sizes), list(gammas),
                                float(eps), _CODES[dt], out.data_ptr(), ws.data_ptr(), c.stream)
    else:
        _C.ascent_step(_ptrs(p), _ptrs(w), _ptrs(d), n, list(step_sizes), list(gammas), float(eps),
                       _CODES[dt], out.data_ptr(), _threads(), _seg())
    _finish(back, (params,))
    return out


def _impl_project_(params, backups, gammas):
    dt, dev = params[0].dtype, params[0].device
    (p, w), back = _prepare([params, backups], (0,))
    n = _numel(p)
    if dev.type == "cuda":
        with _Cuda(dev) as c:
            ws = _ws(_C_cuda.workspace_doubles(n), dev)
            _C_cuda.project(_ptrs(p), _ptrs(w), n, list(gammas), _CODES[dt], ws.data_ptr(), c.stream)
    else:
        _C.project(_ptrs(p), _ptrs(w), n, list(gammas), _CODES[dt], _threads(), _seg())
    _finish(back, (params,))


def _impl_pgd_step_(x_adv, grad, x, alpha, eps, norm):
    dt, dev = x.dtype, x.device
    ([xa], [g], [x0]), back = _prepare([[x_adv], [grad], [x]], (0,))
    code = _CODES[dt]
    if norm == "Linf":
        if dev.type == "cuda":
            with _Cuda(dev) as c:
                _C_cuda.pgd_linf(xa.data_ptr(), g.data_ptr(), x0.data_ptr(), xa.numel(), float(alpha),
                                 float(eps), code, c.stream)
        else:
            _C.pgd_linf(xa.data_ptr(), g.data_ptr(), x0.data_ptr(), xa.numel(), float(alpha),
                        float(eps), code, _threads())
    else:
        batch = x0.shape[0]
        per = x0.numel() // batch if batch else 0
        if dev.type == "cuda":
            with _Cuda(dev) as c:
                ws = _ws(_C_cuda.pgd_workspace_doubles(batch, per), dev)
                _C_cuda.pgd_l2(xa.data_ptr(), g.data_ptr(), x0.data_ptr(), batch, per, float(alpha),
                               float(eps), code, ws.data_ptr(), c.stream)
        else:
            _C.pgd_l2(xa.data_ptr(), g.data_ptr(), x0.data_ptr(), batch, per, float(alpha), float(eps),
                      code, _threads(), _seg())
    _finish(back, ([x_adv],))


# --------------------------------------------------------------------------- family ops
def _scale_ptr(scale_t, device):
    if scale_t is None:
        return 0
    if scale_t.device != device or scale_t.dtype != torch.float64 or not scale_t.is_contiguous():
        raise ValueError("native: scale_t must be a contiguous float64 tensor on the params' device")
    return scale_t.data_ptr()


def _impl_add_scaled_(params, directions, scales, scale_t, clip, base, backups, deltas):
    if not params:
        return
    dt, dev = params[0].dtype, params[0].device
    base, backups, deltas = base or None, backups or None, deltas or None
    (p, d, w, b, v), back = _prepare([params, directions, base, backups, deltas], (0, 3, 4))
    n = _numel(p)
    sp = _scale_ptr(scale_t, dev)
    sl = [] if sp else list(scales)
    has_clip = clip is not None
    c = float(clip) if has_clip else 0.0
    if dev.type == "cuda":
        with _Cuda(dev) as cu:
            ws = _ws(_C_cuda.workspace_doubles(n), dev)
            _C_cuda.add_scaled(_ptrs(p), _ptrs(d), _ptrs(w), _ptrs(b), _ptrs(v), n, sl, sp, has_clip, c,
                               _CODES[dt], ws.data_ptr(), cu.stream)
    else:
        _C.add_scaled(_ptrs(p), _ptrs(d), _ptrs(w), _ptrs(b), _ptrs(v), n, sl, sp, has_clip, c, _CODES[dt],
                      _threads())
    _finish(back, (params, backups, deltas))


def _impl_global_sqnorm(tensors, weights, eta):
    dt, dev = tensors[0].dtype, tensors[0].device
    out = torch.empty((), dtype=acc_dtype(dt), device=dev)
    (x, w), _ = _prepare([tensors, weights or None], ())
    n = _numel(x)
    if dev.type == "cuda":
        with _Cuda(dev) as cu:
            ws = _ws(_C_cuda.workspace_doubles(n), dev)
            _C_cuda.global_sqnorm(_ptrs(x), _ptrs(w), n, float(eta), _CODES[dt], out.data_ptr(), ws.data_ptr(),
                                  cu.stream)
    else:
        _C.global_sqnorm(_ptrs(x), _ptrs(w), n, float(eta), _CODES[dt], out.data_ptr(), _threads())
    return out


def _impl_asam_apply_(params, directions, scales, scale_t, eta, backups):
    if not params:
        return
    dt, dev = params[0].dtype, params[0].device
    backups = backups or None
    (p, d, b), back = _prepare([params, directions, backups], (0, 2))
    n = _numel(p)
    sp = _scale_ptr(scale_t, dev)
    sl = [] if sp else list(scales)
    if dev.type == "cuda":
        with _Cuda(dev) as cu:
            ws = _ws(_C_cuda.workspace_doubles(n), dev)
            _C_cuda.asam_apply(_ptrs(p), _ptrs(d), _ptrs(b), n, sl, sp, float(eta), _CODES[dt], ws.data_ptr(),
                               cu.stream)
    else:
        _C.asam_apply(_ptrs(p), _ptrs(d), _ptrs(b), n, sl, sp, float(eta), _CODES[dt], _threads())
    _finish(back, (params, backups))


def _impl_box_perturb_(params, directions, adv_lrs, adv_epss, origins, first, eps, dnorms, wnorms):
    dt, dev = params[0].dtype, params[0].device
    out = torch.empty(len(params), dtype=acc_dtype(dt), device=dev)
    (p, d, o), back = _prepare([params, directions, origins], (0, 2))
    n = _numel(p)
    gd = _scale_ptr(dnorms, dev)
    gw = _scale_ptr(wnorms, dev)
    if dev.type == "cuda":
        with _Cuda(dev) as cu:
            ws = _ws(_C_cuda.workspace_doubles(n), dev)
            _C_cuda.box_perturb(_ptrs(p), _ptrs(d), _ptrs(o), n, list(adv_lrs), list(adv_epss), bool(first),
                                float(eps), gd, gw, _CODES[dt], out.data_ptr(), ws.data_ptr(), cu.stream)
    else:
        _C.box_perturb(_ptrs(p), _ptrs(d), _ptrs(o), n, list(adv_lrs), list(adv_epss), bool(first), float(eps),
                       gd, gw, _CODES[dt], out.data_ptr(), _threads(), _seg())
    _finish(back, (params, origins))
    return out


# --------------------------------------------------------------------------- torch.library
# The ops are registered as torch.library custom ops (``awpfast::native_*``, see _library.py)
# so that torch.compile treats each call as one opaque node instead of breaking the graph on
# data_ptr(); eager calls skip the dispatcher. Every op has its kernel in both extensions.
_OPS = SeamOps("native_", {
    "norms": _impl_norms, "perturb_": _impl_perturb_, "restore_": _impl_restore_, "unperturb_": _impl_unperturb_,
    "ascent_step_": _impl_ascent_step_, "project_": _impl_project_, "pgd_step_": _impl_pgd_step_,
    "add_scaled_": _impl_add_scaled_, "global_sqnorm": _impl_global_sqnorm, "asam_apply_": _impl_asam_apply_,
    "box_perturb_": _impl_box_perturb_,
}, register=_C is not None)

# --------------------------------------------------------------------------- the group functions
# ``norms``, ``perturb_``, ... ``box_perturb_``: one per op of the table (``_spec.NAMES``), each
# converting its arguments for the custom op above and calling it (see ``SeamOps.group``).
globals().update(_OPS.group_functions())
