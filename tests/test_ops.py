"""The seam ops of every CPU backend against a float64 reference (design brief section 4)."""

import pytest
import torch

import awpfast.ops as ops
from conftest import rel_err, tol

CPU_BACKENDS = [b for b in ("reference", "foreach", "native") if b in ops.available_backends()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ODD_SHAPES = [(3, 5), (1,), (0,), (7, 3, 3, 3), (1023,), (1025,), (4097,), (2, 1, 1)]


def _rand(shapes, dtype, gen_scale=1.0):
    return [(torch.randn(s, dtype=torch.float64) * gen_scale).to(dtype) for s in shapes]


def _poison(ts):
    return [torch.full_like(t, float("nan")) for t in ts]


def _ref_perturb(ps, ds, gammas, eps=1e-20):
    """float64 formula of the brief, written independently of every backend."""
    out, vs = [], []
    for p, d, g in zip(ps, ds, gammas):
        p64, d64 = p.double(), d.double()
        v = g * p64.norm() / (d64.norm() + eps) * d64
        vs.append(v)
        out.append(p64 + v)
    return out, vs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_matches_float64(backend, dtype):
    ps = _rand(ODD_SHAPES, dtype)
    ds = _rand(ODD_SHAPES, dtype, 1e-3)
    gammas = [0.01 * (i + 1) for i in range(len(ps))]
    ref, ref_v = _ref_perturb(ps, ds, gammas)
    work = [p.clone() for p in ps]
    backups, deltas = _poison(ps), _poison(ps)
    dn = ops.perturb_(work, ds, gammas, backups=backups, deltas=deltas, backend=backend)
    for i, p in enumerate(ps):
        assert torch.equal(backups[i], p), "backup must be a bit-exact copy"
        assert rel_err(work[i], ref[i]) <= tol(dtype), (i, rel_err(work[i], ref[i]))
        if p.numel():
            assert rel_err(deltas[i], ref_v[i]) <= max(tol(dtype), 1e-6), i
    ref_dn = torch.stack([d.double().norm() for d in ds])
    assert rel_err(dn, ref_dn) <= max(tol(dtype), 1e-6)
    assert dn.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_perturb_relative_size_is_gamma(backend):
    ps = _rand([(64, 3, 3, 3), (10, 64)], torch.float64)
    ds = _rand([(64, 3, 3, 3), (10, 64)], torch.float64, 1e-4)
    work = [p.clone() for p in ps]
    ops.perturb_(work, ds, 0.005, backend=backend)
    for p, w in zip(ps, work):
        assert abs((w - p).norm() / p.norm() - 0.005) < 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_many_tensors_and_without_buffers(backend):
    shapes = [(int(s),) for s in torch.randint(0, 40, (1200,))]
    ps = _rand(shapes, torch.float32)
    ds = _rand(shapes, torch.float32)
    ref, _ = _ref_perturb(ps, ds, [0.02] * len(ps))
    work = [p.clone() for p in ps]
    ops.perturb_(work, ds, 0.02, backend=backend)
    for w, r in zip(work, ref):
        assert rel_err(w, r) <= 1e-6
    ops.restore_(work, ps, backend=backend)
    assert all(torch.equal(w, p) for w, p in zip(work, ps))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_and_unperturb(backend, dtype):
    ps = _rand(ODD_SHAPES, dtype)
    work = _poison(ps)
    ops.restore_(work, ps, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(work, ps))
    vs = _rand(ODD_SHAPES, dtype, 1e-2)
    ops.unperturb_(work, vs, backend=backend)
    for w, p, v in zip(work, ps, vs):
        assert rel_err(w, p.double() - v.double()) <= tol(dtype)


def _ref_project(w, v, gamma):
    r = gamma * w.double().norm()
    n = v.norm()
    return v * min(1.0, (r / n).item()) if n > 0 else v


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ascent_step_and_project(backend, dtype):
    shapes = [(5, 7), (1,), (0,), (3, 3, 3, 3), (1025,)]
    w = _rand(shapes, dtype)
    d = _rand(shapes, dtype)
    v0 = _rand(shapes, dtype, 1e-3)
    p = [(a.double() + b.double()).to(dtype) for a, b in zip(w, v0)]
    gam, eta = 0.01, 0.007
    exp = []
    for wi, pi, di in zip(w, p, d):
        v = pi.double() - wi.double() + eta * wi.double().norm() / (di.double().norm() + 1e-20) * di.double()
        exp.append(wi.double() + _ref_project(wi, v, gam))
    work = [t.clone() for t in p]
    ops.ascent_step_(work, w, d, eta, gam, backend=backend)
    for i in range(len(shapes)):
        assert rel_err(work[i], exp[i]) <= tol(dtype), i
        if w[i].numel():  # inside the ball (up to rounding)
            vn = (work[i].double() - w[i].double()).norm() / w[i].double().norm()
            assert vn <= gam * (1 + 10 * tol(dtype)) + (1e-2 if dtype == torch.bfloat16 else 0)
    # project_: a perturbation far outside the ball is pulled back to its surface
    big = [(a.double() + 0.5 * torch.randn_like(a.double()) * a.double().norm() / max(a.numel(), 1) ** 0.5).to(dtype)
           for a in w]
    exp = [wi.double() + _ref_project(wi, bi.double() - wi.double(), gam) for wi, bi in zip(w, big)]
    ops.project_(big, w, gam, backend=backend)
    for i in range(len(shapes)):
        assert rel_err(big[i], exp[i]) <= tol(dtype), i


def _torchattacks_style_step(x_adv, g, x, alpha, eps, norm):
    """The established step of PGD libraries, written out in float64."""
    x_adv, g, x = x_adv.double(), g.double(), x.double()
    if norm == "Linf":
        x_adv = x_adv + alpha * g.sign()
        delta = torch.clamp(x_adv - x, min=-eps, max=eps)
    else:
        b = x.shape[0]
        gn = g.reshape(b, -1).norm(dim=1) + 1e-10
        x_adv = x_adv + alpha * g / gn.view(-1, 1, 1, 1)
        delta = x_adv - x
        dn = delta.reshape(b, -1).norm(dim=1)
        delta = delta * torch.clamp(eps / dn, max=1.0).view(-1, 1, 1, 1)
    return torch.clamp(x + delta, 0, 1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm,eps,alpha", [("Linf", 8 / 255, 2 / 255), ("L2", 0.5, 0.1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pgd_step(backend, norm, eps, alpha, dtype):
    x = torch.rand(5, 3, 7, 9, dtype=dtype)
    x_adv = torch.clamp(x + (torch.rand_like(x) * 2 - 1) * eps * 0.5, 0, 1)
    g = torch.randn_like(x)
    exp = _torchattacks_style_step(x_adv, g, x, alpha, eps, norm)
    out = x_adv.clone()
    ops.pgd_step_(out, g, x, alpha, eps, norm, backend=backend)
    assert rel_err(out, exp) <= tol(dtype) * 10
    assert out.min() >= 0 and out.max() <= 1
    if norm == "Linf":
        assert (out - x).abs().max() <= eps + 1e-6
    else:
        assert (out - x).reshape(5, -1).norm(dim=1).max() <= eps * (1 + 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic(backend):
    ps = _rand([(33, 17), (4097,), (5,)], torch.float32)
    ds = _rand([(33, 17), (4097,), (5,)], torch.float32)
    outs = []
    for _ in range(3):
        w = [p.clone() for p in ps]
        n = ops.perturb_(w, ds, 0.01, backend=backend)
        outs.append((w, n))
    for w, n in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(w, outs[0][0]))
        assert torch.equal(n, outs[0][1])


def test_mixed_groups_keep_input_order():
    ps = [torch.randn(4, 3), torch.randn(5, dtype=torch.float64), torch.randn(6, 2)]
    ds = [torch.randn_like(p) for p in ps]
    dn = ops.perturb_([p.clone() for p in ps], ds, 0.01, backend="foreach")
    assert torch.allclose(dn.double(), torch.stack([d.double().norm() for d in ds]), rtol=1e-6)
    assert torch.allclose(ops.norms(ps, backend="foreach").double(), torch.stack([p.double().norm() for p in ps]),
                          rtol=1e-6)


def test_validation_errors():
    p = [torch.randn(3, 3)]
    with pytest.raises(ValueError, match="shape"):
        ops.perturb_(p, [torch.randn(3, 4)], 0.1)
    with pytest.raises(ValueError, match="has 1 tensors but directions has 2"):
        ops.perturb_(p, [torch.randn(3, 3)] * 2, 0.1)
    with pytest.raises(ValueError, match="gamma must be finite"):
        ops.perturb_(p, [torch.randn(3, 3)], -1.0)
    with pytest.raises(TypeError, match="list of tensors"):
        ops.restore_(p[0], p[0])
    with pytest.raises(ValueError, match="unknown awpfast backend"):
        ops.restore_(p, [p[0].clone()], backend="cuda-magic")
    with pytest.raises(ValueError, match="norm must be"):
        ops.pgd_step_(torch.rand(2, 3), torch.rand(2, 3), torch.rand(2, 3), 0.1, 0.1, "L1")
    with pytest.raises(ValueError, match="dtype of params"):
        ops.perturb_(p, [torch.randn(3, 3)], 0.1, backups=[torch.randn(3, 3, dtype=torch.float64)])


def test_env_variable_picks_backend(monkeypatch):
    import awpfast.ops.reference as ref
    calls = []
    orig = ref.restore_
    monkeypatch.setattr(ref, "restore_", lambda a, b: (calls.append(1), orig(a, b)))
    monkeypatch.setenv("AWPFAST_BACKEND", "reference")
    p = [torch.randn(3)]
    ops.restore_(p, [torch.randn(3)])
    assert calls == [1]
    monkeypatch.setenv("AWPFAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown awpfast backend 'nonsense'"):
        ops.restore_(p, [torch.randn(3)])
