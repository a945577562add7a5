"""Foreach backend: ``torch._foreach_*`` over a whole (device, dtype) group.

No per-layer host sync: the per-layer scales are computed on the device as one small
tensor and applied with ``_foreach_mul``/``_foreach_add_``. Low-precision parameters are
handled with fp32 math (the scaled direction is formed in fp32, then cast once).
"""
import torch

from .reference import available, supports, supports_device  # noqa: F401  (any device, float dtypes)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def norms(tensors):
    acc = _acc_dtype(tensors[0].dtype)
    if acc == tensors[0].dtype:
        ns = torch._foreach_norm(tensors)
    else:
        ns = torch._foreach_norm(tensors, dtype=acc)
    return torch.stack(ns).to(acc)


def _scaled(directions, scale, acc):
    """[scale[i] * d_i] in the accumulation dtype, as a list of new tensors."""
    if directions[0].dtype != acc:
        directions = [d.to(acc) for d in directions]
    return torch._foreach_mul(directions, list(scale.unbind(0)))


def perturb_(params, directions, gammas, eps, backups, deltas):
    acc = _acc_dtype(params[0].dtype)
    wn = norms(params)
    dn = norms(directions)
    if backups is not None:
        torch._foreach_copy_(backups, params)
    scale = torch.tensor(gammas, dtype=acc, device=wn.device) * wn / (dn + eps)
    scales = list(scale.unbind(0))
    if deltas is None:
        # p += d * s_l in one pass, no temporaries; the 0-dim fp32 scale keeps fp32 math
        # (one rounding) for low-precision parameters
        torch._foreach_addcmul_(params, directions, scales)
    elif params[0].dtype == acc:
        torch._foreach_copy_(deltas, directions)
        torch._foreach_mul_(deltas, scales)
        torch._foreach_add_(params, deltas)
    else:
        v = _scaled(directions, scale, acc)
        p32 = [p.to(acc) for p in params]
        torch._foreach_add_(p32, v)
        torch._foreach_copy_(params, p32)
        torch._foreach_copy_(deltas, v)
    return dn


def restore_(params, backups):
    torch._foreach_copy_(params, backups)


def unperturb_(params, deltas):
    acc = _acc_dtype(params[0].dtype)
    if params[0].dtype == acc:
        torch._foreach_sub_(params, deltas)
    else:
        p32 = [p.to(acc) for p in params]
        torch._foreach_sub_(p32, [v.to(acc) for v in deltas])
        torch._foreach_copy_(params, p32)


def _project_into(params, backups, v, gammas, acc):
    """params <- w + v * min(1, gamma * ||w|| / ||v||), with v in the accumulation dtype."""
    wn = norms(backups)
    vn = torch.stack(torch._foreach_norm(v)).to(acc)
    radius = torch.tensor(gammas, dtype=acc, device=wn.device) * wn
    factor = torch.where(vn > radius, radius / torch.where(vn > 0, vn, torch.ones_like(vn)),
                         torch.ones_like(vn))
    torch._foreach_mul_(v, list(factor.unbind(0)))
    w = backups if backups[0].dtype == acc else [b.to(acc) for b in backups]
    out = torch._foreach_add(w, v)
    torch._foreach_copy_(params, out)


def ascent_step_(params, backups, directions, step_sizes, gammas, eps):
    acc = _acc_dtype(params[0].dtype)
    wn = norms(backups)
    dn = norms(directions)
    scale = torch.tensor(step_sizes, dtype=acc, device=wn.device) * wn / (dn + eps)
    p = params if params[0].dtype == acc else [t.to(acc) for t in params]
    w = backups if backups[0].dtype == acc else [t.to(acc) for t in backups]
    v = torch._foreach_sub(p, w)
    torch._foreach_add_(v, _scaled(directions, scale, acc))
    _project_into(params, backups, v, gammas, acc)
    return dn


def project_(params, backups, gammas):
    acc = _acc_dtype(params[0].dtype)
    p = params if params[0].dtype == acc else [t.to(acc) for t in params]
    w = backups if backups[0].dtype == acc else [t.to(acc) for t in backups]
    _project_into(params, backups, torch._foreach_sub(p, w), gammas, acc)


def add_scaled_(params, directions, scales, clip, base, backups, deltas):
    acc = _acc_dtype(params[0].dtype)
    if isinstance(scales, torch.Tensor):
        scale = scales.to(acc)
    else:
        scale = torch.tensor(scales, dtype=acc, device=params[0].device)
    d = directions if directions[0].dtype == acc else [t.to(acc) for t in directions]
    if clip is not None:
        d = torch._foreach_clamp_max(torch._foreach_clamp_min(d, -clip), clip)
    v = torch._foreach_mul(d, list(scale.unbind(0)))
    if backups is not None:
        torch._foreach_copy_(backups, params)
    if deltas is not None:
        torch._foreach_copy_(deltas, v)
    start = base if base is not None else params
    if start[0].dtype != acc:
        start = [t.to(acc) for t in start]
    out = torch._foreach_add(start, v)
    torch._foreach_copy_(params, out)


def pgd_step_(x_adv, grad, x, alpha, eps, norm):
    if norm == "Linf":
        # x_adv <- clamp(x + clamp(x_adv + alpha*sign(g) - x, -eps, eps), 0, 1)
        x_adv.add_(grad.sign(), alpha=alpha)
        delta = torch.clamp_(x_adv.sub_(x), min=-eps, max=eps)
        torch.clamp_(delta.add_(x), min=0.0, max=1.0)
        return
    b = x.shape[0]
    shape = (-1,) + (1,) * (x.dim() - 1)
    acc = _acc_dtype(x.dtype)
    gn = torch.linalg.vector_norm(grad.reshape(b, -1), dim=1, dtype=acc) + 1e-10
    x_adv.add_(grad * (alpha / gn).to(grad.dtype).view(shape))
    delta = x_adv.sub_(x)
    dn = torch.linalg.vector_norm(delta.reshape(b, -1), dim=1, dtype=acc)
    factor = torch.clamp(eps / dn, max=1.0)
    delta.mul_(factor.to(delta.dtype).view(shape))
    torch.clamp_(delta.add_(x), min=0.0, max=1.0)


# --------------------------------------------------------------------------- family ops (issue 11)
def _in_acc(ts, acc):
    return ts if ts[0].dtype == acc else [t.to(acc) for t in ts]


def global_sqnorm(tensors, weights, eta):
    acc = _acc_dtype(tensors[0].dtype)
    if weights is None:
        ns = norms(tensors)
    else:
        t = torch._foreach_abs(_in_acc(weights, acc))
        if eta:
            torch._foreach_add_(t, eta)
        torch._foreach_mul_(t, _in_acc(tensors, acc))
        ns = torch.stack(torch._foreach_norm(t))
    return (ns * ns).sum()


def asam_apply_(params, directions, scales, eta, backups):
    acc = _acc_dtype(params[0].dtype)
    dev = params[0].device
    scale = scales.to(device=dev, dtype=acc) if isinstance(scales, torch.Tensor) else \
        torch.tensor(scales, dtype=acc, device=dev)
    p = _in_acc(params, acc)            # (a new fp32 copy for low-precision weights)
    v = torch._foreach_abs(p)           # T = |w| + eta, from the weights before the write
    if eta:
        torch._foreach_add_(v, eta)
    torch._foreach_mul_(v, v)           # T^2
    torch._foreach_mul_(v, list(scale.unbind(0)))
    if backups is not None:
        torch._foreach_copy_(backups, params)
    torch._foreach_addcmul_(p, v, _in_acc(directions, acc))
    if p is not params:
        torch._foreach_copy_(params, p)


def box_perturb_(params, directions, adv_lrs, adv_epss, origins, first, eps, pre_norms):
    acc = _acc_dtype(params[0].dtype)
    dev = params[0].device
    if first:
        torch._foreach_copy_(origins, params)
    if pre_norms is None:
        dn, wn = norms(directions), norms(params)
    else:
        dn, wn = (n.to(device=dev, dtype=acc) for n in pre_norms)
    ok = torch.isfinite(dn) & (dn != 0)
    lr = torch.tensor(adv_lrs, dtype=acc, device=dev)
    scale = torch.where(ok, lr * (wn + eps) / torch.where(ok, dn + eps, torch.ones_like(dn)),
                        torch.zeros_like(dn))
    p = _in_acc(params, acc)
    cand = torch._foreach_mul(_in_acc(directions, acc), list(scale.unbind(0)))
    torch._foreach_add_(cand, p)
    o = _in_acc(origins, acc)
    r = torch._foreach_abs(o)
    torch._foreach_mul_(r, adv_epss)
    torch._foreach_maximum_(cand, torch._foreach_sub(o, r))
    torch._foreach_add_(r, o)           # the upper bound, in place
    torch._foreach_minimum_(cand, r)
    # Skipped tensors keep their values. A non-finite direction makes NaN in its candidate
    # (0 * inf) and no torch._foreach op selects per tensor without a host sync, so the
    # select is one torch.where per tensor (the fused kernels skip such tensors instead).
    for k, c, q in zip(ok.unbind(0), cand, p):
        torch.where(k, c, q, out=q)     # elementwise, in place (q: the weights, or their fp32 copy)
    if p is not params:
        torch._foreach_copy_(params, p)
    return dn
