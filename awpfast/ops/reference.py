"""Reference backend: one tensor at a time, plain eager PyTorch. The oracle.

Math runs in float64 for float64 tensors and in float32 otherwise (brief: fp32-or-wider
accumulation); results are cast back to the parameter dtype. Slow on purpose: clarity
first, used by the tests to check every other backend.
"""
import torch

from ._util import acc_dtype


def available():
    return True, ""


def supports_device(device):
    return True


def supports(device, dtype):
    return dtype.is_floating_point


def _acc(t):
    return t.to(acc_dtype(t.dtype))


def _norm(t):
    """Frobenius norm accumulated in float64 (a float32 sum of squares flushes norms below
    ~1e-19 to 0), returned in the accumulation dtype."""
    a = _acc(t)
    if not t.numel():
        return a.new_zeros(())
    return torch.linalg.vector_norm(a.reshape(-1), dtype=torch.float64).to(a.dtype)


def norms(tensors):
    return torch.stack([_norm(t) for t in tensors])


def perturb_(params, directions, gammas, eps, backups, deltas):
    out = []
    for i, (p, d, g) in enumerate(zip(params, directions, gammas)):
        wn, dn = _norm(p), _norm(d)
        out.append(dn)
        if backups is not None:
            backups[i].copy_(p)
        v = (g * wn / (dn + eps)) * _acc(d)
        if deltas is not None:
            deltas[i].copy_(v)
        p.copy_(_acc(p) + v)
    return torch.stack(out)


def restore_(params, backups):
    for p, b in zip(params, backups):
        p.copy_(b)


def unperturb_(params, deltas):
    for p, v in zip(params, deltas):
        p.copy_(_acc(p) - _acc(v))


def _project(w, v, gamma):
    radius = gamma * _norm(w)
    vn = _norm(v)
    factor = torch.clamp(radius / vn, max=1.0) if float(vn) > 0 else torch.ones_like(vn)
    return v * factor


def ascent_step_(params, backups, directions, step_sizes, gammas, eps):
    out = []
    for p, w, d, s, g in zip(params, backups, directions, step_sizes, gammas):
        wn, dn = _norm(w), _norm(d)
        out.append(dn)
        v = _acc(p) - _acc(w) + (s * wn / (dn + eps)) * _acc(d)
        p.copy_(_acc(w) + _project(w, v, g))
    return torch.stack(out)


def project_(params, backups, gammas):
    for p, w, g in zip(params, backups, gammas):
        p.copy_(_acc(w) + _project(w, _acc(p) - _acc(w), g))


def add_scaled_(params, directions, scales, clip, base, backups, deltas):
    for i, (p, d) in enumerate(zip(params, directions)):
        s = scales[i]
        s = s.to(_acc(p).dtype) if isinstance(s, torch.Tensor) else s
        d = _acc(d)
        if clip is not None:
            d = torch.clamp(d, -clip, clip)
        v = s * d
        start = _acc(base[i]) if base is not None else _acc(p)
        if backups is not None:
            backups[i].copy_(p)
        if deltas is not None:
            deltas[i].copy_(v)
        p.copy_(start + v)


def pgd_step_(x_adv, grad, x, alpha, eps, norm):
    xa, g, x0 = _acc(x_adv), _acc(grad), _acc(x)
    if norm == "Linf":
        xa = xa + alpha * g.sign()
        delta = torch.clamp(xa - x0, min=-eps, max=eps)
    else:
        b = x0.shape[0]
        gn = torch.linalg.vector_norm(g.reshape(b, -1), dim=1) + 1e-10
        xa = xa + alpha * g / gn.view(-1, *([1] * (g.dim() - 1)))
        delta = xa - x0
        dn = torch.linalg.vector_norm(delta.reshape(b, -1), dim=1)
        factor = torch.clamp(eps / dn, max=1.0)  # dn == 0 -> inf -> 1
        delta = delta * factor.view(-1, *([1] * (g.dim() - 1)))
    x_adv.copy_(torch.clamp(x0 + delta, min=0.0, max=1.0))


# --------------------------------------------------------------------------- family ops (SAM, ASAM, Box AWP)
def global_sqnorm(tensors, weights, eta):
    total = None
    for i, t in enumerate(tensors):
        x = _acc(t)
        if weights is not None:
            x = (_acc(weights[i]).abs() + eta) * x
        x = x.to(torch.float64)             # the sum of squares in float64 (no underflow)
        s = (x * x).sum()
        total = s if total is None else total + s
    return total.to(_acc(tensors[0]).dtype)


def asam_apply_(params, directions, scales, eta, backups):
    for i, (p, d) in enumerate(zip(params, directions)):
        s = scales[i]
        s = s.to(_acc(p).dtype) if isinstance(s, torch.Tensor) else s
        w = _acc(p)
        t = w.abs() + eta
        if backups is not None:
            backups[i].copy_(p)
        p.copy_(w + s * (t * t) * _acc(d))


def box_perturb_(params, directions, adv_lrs, adv_epss, origins, first, eps, norms):
    out = []
    for i, (p, d, o) in enumerate(zip(params, directions, origins)):
        if first:
            o.copy_(p)
        w = _acc(p)
        if norms is None:
            gn, wn = _norm(d), _norm(p)
        else:
            gn, wn = norms[0][i].to(w.dtype), norms[1][i].to(w.dtype)
        out.append(gn)
        if not (bool(torch.isfinite(gn)) and float(gn) != 0.0):
            continue  # zero or non-finite direction: this tensor is not perturbed
        new = w + adv_lrs[i] * _acc(d) / (gn + eps) * (wn + eps)
        o64 = _acc(o)
        r = adv_epss[i] * o64.abs()
        p.copy_(torch.minimum(torch.maximum(new, o64 - r), o64 + r))
    return torch.stack(out) if out else torch.empty(0)
