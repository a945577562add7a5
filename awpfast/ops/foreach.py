"""Foreach backend: ``torch._foreach_*`` over a whole (device, dtype) group.

No per-layer host sync and no per-layer launch. The per-layer scales are computed on the
device as one small 1-D tensor; on CUDA, ``torch._foreach_*`` ops whose second operand is a
list of 0-dim tensors leave PyTorch's multi-tensor fast path (one launch per tensor), so
there the scales are expanded once into a flat per-element buffer (``repeat_interleave``,
one launch) whose views have the shapes and strides of the tensors: every following
``_foreach_*`` call takes the fast path. (On the CPU, foreach ops loop over the tensors in
any case and the 0-dim scales are kept.)

Precision: norms and per-tensor scalars in float64 (no underflow of tiny norms); the
element-wise math in float32 (float64 for float64 tensors), each result rounded once to the
tensor dtype. For bf16/fp16 groups the directions and weights are
converted into float32 buffers first: a float32 scale multiplied into a bf16 tensor would
otherwise be rounded to bf16 (a ~0.2 % error in v) by type promotion.

Per-tensor floats and element counts become small cached device tables (one host-to-device
copy the first time); inside a CUDA-graph capture a missing table is built from kernel
arguments (``torch.full``), so the backend is capturable after one eager warm-up.
"""
import collections
import threading

import torch

from ._util import acc_dtype, is_dense
from .reference import available, supports, supports_device  # noqa: F401  (any device, float dtypes)


# --------------------------------------------------------------------------- small device tables
_lock = threading.Lock()
_tables: "collections.OrderedDict" = collections.OrderedDict()
_TABLE_CAP = 256
_pinned: dict = {}  # id -> table read by a captured CUDA graph: kept alive forever


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _table(values, dtype, device):
    """``torch.tensor(values, dtype, device)``, cached by value, safe under CUDA-graph capture
    and on any stream (an event and ``record_stream`` for streams other than the builder's).
    While Dynamo traces, a plain constant tensor (the compiled graph owns it)."""
    if torch.compiler.is_compiling():
        return torch.tensor(list(values), dtype=dtype, device=device)
    key = (device, dtype, tuple(values))
    cuda = device.type == "cuda"
    with _lock:
        hit = _tables.get(key)
        if hit is not None:
            _tables.move_to_end(key)
    if hit is not None:
        t, ev, streams = hit
        if cuda:
            if _capturing(device):
                _pinned[id(t)] = hit
            else:
                cur = torch.cuda.current_stream(device)
                if cur.cuda_stream not in streams:
                    cur.wait_event(ev)
                    t.record_stream(cur)
                    streams.add(cur.cuda_stream)
        return t
    if cuda and _capturing(device):  # built from kernel arguments inside the graph, not cached
        if not values:
            return torch.empty(0, dtype=dtype, device=device)
        return torch.stack([torch.full((), v, dtype=dtype, device=device) for v in values])
    if cuda:
        t = torch.tensor(list(values), dtype=dtype).pin_memory().to(device, non_blocking=True)
        cur = torch.cuda.current_stream(device)
        ev = torch.cuda.Event()
        ev.record(cur)
        entry = (t, ev, {cur.cuda_stream})
    else:
        t = torch.tensor(list(values), dtype=dtype, device=device)
        entry = (t, None, set())
    with _lock:
        _tables[key] = entry
        while len(_tables) > _TABLE_CAP:
            _tables.popitem(last=False)
    return t


# --------------------------------------------------------------------------- flat helpers
def _views_like(flat, ts):
    """Views of the flat buffer ``flat`` with the shapes (and, for dense tensors, the strides)
    of ``ts``, so that foreach ops pairing them with ``ts`` keep the fast path."""
    out = []
    for seg, t in zip(flat.split([t.numel() for t in ts]), ts):
        if t.is_contiguous() or not is_dense(t):
            out.append(seg.view(t.shape))
        else:
            out.append(seg.as_strided(t.shape, t.stride()))
    return out


def _buffer_like(ts, dtype):
    n = sum(t.numel() for t in ts)
    return _views_like(torch.empty(n, dtype=dtype, device=ts[0].device), ts)


def _in_acc(ts, acc):
    """``ts`` themselves when already in the accumulation dtype, else float copies (one
    multi-tensor copy into one flat buffer)."""
    if ts[0].dtype == acc:
        return list(ts)
    out = _buffer_like(ts, acc)
    torch._foreach_copy_(out, ts)
    return out


def _copy_in(ts, dtype):
    """A copy of ``ts`` in ``dtype`` (one flat buffer, one multi-tensor copy)."""
    out = _buffer_like(ts, dtype)
    torch._foreach_copy_(out, ts)
    return out


# Expand per-tensor scales into a per-element buffer (None: on CUDA only, where it keeps the
# multi-tensor fast path; CPU foreach ops loop over tensors anyway, so 0-dim scales cost
# nothing there). Tests set True to check the CUDA code path on the CPU.
EXPAND_SCALES = None


def _per_element(scale, ts):
    """Per-tensor ``scale`` (1-D, on the device; no host sync) as operands for a foreach op
    with ``ts`` (always in the accumulation dtype here, so the scale is never rounded to a
    low precision): views shaped like ``ts`` of one flat buffer holding ``scale[i]`` over
    tensor i's elements (CUDA), or a list of 0-dim tensors (CPU)."""
    expand = EXPAND_SCALES if EXPAND_SCALES is not None else scale.device.type == "cuda"
    if not expand:
        return list(scale.unbind(0))
    sizes = [t.numel() for t in ts]
    counts = _table(sizes, torch.int64, scale.device)
    flat = torch.repeat_interleave(scale, counts, output_size=sum(sizes))
    return _views_like(flat, ts)


def _floats_on(vals, dtype, device):
    """A Python float (uniform values) or a cached 1-D device tensor of per-tensor floats."""
    if isinstance(vals, (int, float)):
        return float(vals)
    vals = [float(v) for v in vals]
    if all(v == vals[0] for v in vals):
        return vals[0]
    return _table(vals, dtype, device)


def _write(params, result):
    if result is not params:
        torch._foreach_copy_(params, result)


def _add_scaled(params, start, directions, scale, deltas, acc):
    """params <- start + scale_i * directions (scale: 1-D device tensor in ``acc``), the
    product and sum in ``acc`` and each result rounded once; deltas <- scale_i * directions."""
    S = _per_element(scale, params)
    if params[0].dtype == acc:
        if deltas is None and start is params:
            torch._foreach_addcmul_(params, directions, S)
            return
        v = deltas if deltas is not None else _buffer_like(params, acc)
        torch._foreach_copy_(v, directions)
        torch._foreach_mul_(v, S)
        if start is not params:
            torch._foreach_copy_(params, start)
        torch._foreach_add_(params, v)
        return
    d32 = _copy_in(directions, acc)
    torch._foreach_mul_(d32, S)                 # v in fp32
    p32 = _copy_in(start, acc)
    torch._foreach_add_(p32, d32)
    torch._foreach_copy_(params, p32)           # one rounding to the parameter dtype
    if deltas is not None:
        torch._foreach_copy_(deltas, d32)


# --------------------------------------------------------------------------- the ops
def _norms64(tensors):
    """Per-tensor norms computed in float64 (a float32 sum of squares underflows for
    ||x|| below ~1e-19, so a tiny direction would get norm 0), as one 1-D tensor."""
    return torch.stack(torch._foreach_norm(tensors, dtype=torch.float64))


def norms(tensors):
    return _norms64(tensors).to(acc_dtype(tensors[0].dtype))


def _scale(gammas, wn64, dn64, eps, acc):
    """gamma_i * ||w_i|| / (||d_i|| + eps), in float64, as a 1-D device tensor in ``acc``."""
    ratio = wn64 / (dn64 + eps)
    g = _floats_on(gammas, torch.float64, wn64.device)
    return (ratio * g).to(acc)


def perturb_(params, directions, gammas, eps, backups, deltas):
    acc = acc_dtype(params[0].dtype)
    wn = _norms64(params)
    dn = _norms64(directions)
    if backups is not None:
        torch._foreach_copy_(backups, params)
    _add_scaled(params, params, directions, _scale(gammas, wn, dn, eps, acc), deltas, acc)
    return dn.to(acc)


def restore_(params, backups):
    torch._foreach_copy_(params, backups)


def unperturb_(params, deltas):
    acc = acc_dtype(params[0].dtype)
    if params[0].dtype == acc:
        torch._foreach_sub_(params, deltas)
        return
    p32 = _in_acc(params, acc)
    torch._foreach_sub_(p32, _in_acc(deltas, acc))
    torch._foreach_copy_(params, p32)


def _project_into(params, backups, v, gammas, acc):
    """params <- w + v * min(1, gamma * ||w|| / ||v||), with v (mutated) in the accumulation dtype."""
    wn = _norms64(backups)
    vn = _norms64(v)
    radius = wn * _floats_on(gammas, torch.float64, wn.device)
    factor = torch.where(vn > radius, radius / torch.where(vn > 0, vn, torch.ones_like(vn)),
                         torch.ones_like(vn))
    torch._foreach_mul_(v, _per_element(factor.to(acc), v))
    w = _in_acc(backups, acc)
    torch._foreach_add_(v, w)
    torch._foreach_copy_(params, v)


def ascent_step_(params, backups, directions, step_sizes, gammas, eps):
    acc = acc_dtype(params[0].dtype)
    wn = _norms64(backups)
    dn = _norms64(directions)
    scale = _scale(step_sizes, wn, dn, eps, acc)
    v = _buffer_like(params, acc)
    torch._foreach_copy_(v, params)
    torch._foreach_sub_(v, _in_acc(backups, acc))
    torch._foreach_addcmul_(v, _in_acc(directions, acc), _per_element(scale, v))
    _project_into(params, backups, v, gammas, acc)
    return dn.to(acc)


def project_(params, backups, gammas):
    acc = acc_dtype(params[0].dtype)
    v = _buffer_like(params, acc)
    torch._foreach_copy_(v, params)
    torch._foreach_sub_(v, _in_acc(backups, acc))
    _project_into(params, backups, v, gammas, acc)


def add_scaled_(params, directions, scales, clip, base, backups, deltas):
    acc = acc_dtype(params[0].dtype)
    dev = params[0].device
    if isinstance(scales, torch.Tensor):
        scale = scales.to(device=dev, dtype=acc)
    else:
        s = _floats_on(scales, acc, dev)
        scale = s if isinstance(s, torch.Tensor) else torch.full((len(params),), s, dtype=acc, device=dev)
    d = directions
    if clip is not None:  # clamp a copy (the caller's directions are never written)
        d = _copy_in(directions, acc)
        torch._foreach_clamp_min_(d, -clip)
        torch._foreach_clamp_max_(d, clip)
    if backups is not None:
        torch._foreach_copy_(backups, params)
    start = params if base is None else base
    if d[0].dtype != params[0].dtype:  # clipped low-precision directions, already an fp32 copy
        S = _per_element(scale, params)
        torch._foreach_mul_(d, S)
        p32 = _in_acc(start, acc)
        torch._foreach_add_(p32, d)
        torch._foreach_copy_(params, p32)
        if deltas is not None:
            torch._foreach_copy_(deltas, d)
        return
    _add_scaled(params, start, d, scale, deltas, acc)


def pgd_step_(x_adv, grad, x, alpha, eps, norm):
    if norm == "Linf":
        # x_adv <- clamp(x + clamp(x_adv + alpha*sign(g) - x, -eps, eps), 0, 1)
        x_adv.add_(grad.sign(), alpha=alpha)
        delta = torch.clamp_(x_adv.sub_(x), min=-eps, max=eps)
        torch.clamp_(delta.add_(x), min=0.0, max=1.0)
        return
    b = x.shape[0]
    shape = (-1,) + (1,) * (x.dim() - 1)
    acc = acc_dtype(x.dtype)
    gn = torch.linalg.vector_norm(grad.reshape(b, -1), dim=1, dtype=acc) + 1e-10
    x_adv.add_(grad * (alpha / gn).to(grad.dtype).view(shape))
    delta = x_adv.sub_(x)
    dn = torch.linalg.vector_norm(delta.reshape(b, -1), dim=1, dtype=acc)
    factor = torch.clamp(eps / dn, max=1.0)
    delta.mul_(factor.to(delta.dtype).view(shape))
    torch.clamp_(delta.add_(x), min=0.0, max=1.0)


# --------------------------------------------------------------------------- family ops (SAM, ASAM, Box AWP)
# Scratch space: on CUDA one flat buffer per list (the multi-tensor fast path, and the box
# select as one torch.where); on the CPU per-tensor temporaries, which the allocator reuses
# from step to step (a flat buffer of a whole model is a fresh mapping, page-faulted on every
# call: several times slower there), and the select as one in-place torch.where per tensor.
def _flat(device) -> bool:
    return EXPAND_SCALES if EXPAND_SCALES is not None else device.type == "cuda"


def _abs_scratch(ts, acc):
    """|ts| in ``acc``, as new tensors."""
    if _flat(ts[0].device) or ts[0].dtype != acc:
        out = _copy_in(ts, acc)
        torch._foreach_abs_(out)
        return out
    return list(torch._foreach_abs(ts))


def _mul_per_tensor(ts, scale):
    """ts[i] *= scale[i] (``scale``: a float, or a 1-D device tensor in the dtype of ``ts``)."""
    if isinstance(scale, float):
        torch._foreach_mul_(ts, scale)
    else:
        torch._foreach_mul_(ts, _per_element(scale, ts))


def global_sqnorm(tensors, weights, eta):
    acc = acc_dtype(tensors[0].dtype)
    if weights is None:
        ns = _norms64(tensors)
    else:
        t = _abs_scratch(weights, acc)      # T = |w| + eta, then T * x, in one scratch list
        if eta:
            torch._foreach_add_(t, eta)
        torch._foreach_mul_(t, _in_acc(tensors, acc))
        ns = _norms64(t)
    return (ns * ns).sum().to(acc)          # the sum of squares in float64


def asam_apply_(params, directions, scales, eta, backups):
    acc = acc_dtype(params[0].dtype)
    dev = params[0].device
    scale = scales.to(device=dev, dtype=acc) if isinstance(scales, torch.Tensor) else _floats_on(scales, acc, dev)
    v = _abs_scratch(params, acc)           # T = |w| + eta, from the weights before the write
    if eta:
        torch._foreach_add_(v, eta)
    torch._foreach_mul_(v, v)               # T^2
    _mul_per_tensor(v, scale)
    if backups is not None:
        torch._foreach_copy_(backups, params)
    if params[0].dtype == acc:
        torch._foreach_addcmul_(params, v, directions)
    else:
        p32 = _copy_in(params, acc)
        torch._foreach_addcmul_(p32, v, _in_acc(directions, acc))
        torch._foreach_copy_(params, p32)   # one rounding to the parameter dtype


def box_perturb_(params, directions, adv_lrs, adv_epss, origins, first, eps, pre_norms):
    acc = acc_dtype(params[0].dtype)
    dev = params[0].device
    flat = _flat(dev)
    if first:
        torch._foreach_copy_(origins, params)
    if pre_norms is None:
        dn, wn = _norms64(directions), _norms64(params)
    else:
        dn, wn = (n.to(device=dev, dtype=torch.float64) for n in pre_norms)
    ok = torch.isfinite(dn) & (dn != 0)
    lr = _floats_on(adv_lrs, torch.float64, dev)
    scale = torch.where(ok, lr * (wn + eps) / torch.where(ok, dn + eps, torch.ones_like(dn)),
                        torch.zeros_like(dn)).to(acc)
    o = _in_acc(origins, acc)
    # cand <- p + adv_lr * (||w|| + eps) / (||g|| + eps) * g
    if flat:  # CUDA: flat scratch buffers (multi-tensor fast path, one select)
        n = sum(t.numel() for t in params)
        cand_flat, p_flat = (torch.empty(n, dtype=acc, device=dev) for _ in range(2))
        cand, p = _views_like(cand_flat, params), _views_like(p_flat, params)
        torch._foreach_copy_(cand, directions)
        _mul_per_tensor(cand, scale)
        torch._foreach_copy_(p, params)
        torch._foreach_add_(cand, p)
    else:     # CPU: fresh model-sized scratch costs more than a pass here (page faults)
        p = _in_acc(params, acc)            # the weights themselves (or a float32 copy)
        d = _in_acc(directions, acc)
        if first:  # in place: the skipped tensors' old values are the origins
            torch._foreach_addcmul_(p, d, list(scale.unbind(0)))
            cand, keep = p, o
        else:
            cand, keep = list(torch._foreach_addcmul(p, d, list(scale.unbind(0)))), p
    # the box, with one scratch list for both bounds
    ae = _floats_on(adv_epss, acc, dev)
    r = _abs_scratch(origins, acc)
    _mul_per_tensor(r, ae)
    torch._foreach_neg_(r)
    torch._foreach_add_(r, o)               # w0 + (-adv_eps*|w0|) == w0 - adv_eps*|w0|
    torch._foreach_maximum_(cand, r)
    torch._foreach_copy_(r, o)
    torch._foreach_abs_(r)
    _mul_per_tensor(r, ae)
    torch._foreach_add_(r, o)               # w0 + adv_eps*|w0|
    torch._foreach_minimum_(cand, r)
    # A skipped tensor (||g|| zero or not finite) keeps its values: a non-finite direction
    # makes NaN in its candidate (0 * inf), and no foreach op selects per tensor.
    if flat:  # one torch.where over the flat buffer, the per-tensor flag expanded per element
        sizes = [t.numel() for t in params]
        mask = torch.repeat_interleave(ok, _table(sizes, torch.int64, dev), output_size=sum(sizes))
        torch.where(mask, cand_flat, p_flat, out=cand_flat)
        torch._foreach_copy_(params, cand)  # one rounding to the parameter dtype
        return dn.to(acc)
    for k, c, q, t in zip(ok.unbind(0), cand, keep, p):  # CPU: one in-place torch.where per tensor
        torch.where(k, c, q, out=t)
    if params[0].dtype != acc:
        torch._foreach_copy_(params, p)     # one rounding to the parameter dtype
    return dn.to(acc)
