"""The seam ops of every backend against a float64 reference (design brief section 4).

Each test runs per (backend, device): the CPU backends (reference, foreach, native; the
Triton interpreter has its own tests in test_triton.py) and, on a CUDA machine, every
backend on CUDA (foreach on CUDA included), each compared with float64 on the CPU.
"""

import pytest
import torch

import awpfast.ops as ops
from conftest import backend_device_params as _bdp, on_device, poisoned, rand_tensors, rel_err, tol

CPU_BACKENDS = [b for b in ("reference", "foreach", "native") if b in ops.available_backends()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ODD_SHAPES = [(3, 5), (1,), (0,), (7, 3, 3, 3), (1023,), (1025,), (4097,), (2, 1, 1)]




def backend_device_params(cpu_backends=None):
    return _bdp(CPU_BACKENDS if cpu_backends is None else cpu_backends)


BD = backend_device_params()


def _ref_perturb(ps, ds, gammas, eps=1e-20):
    """float64 formula of the brief, written independently of every backend."""
    out, vs = [], []
    for p, d, g in zip(ps, ds, gammas):
        p64, d64 = p.double(), d.double()
        v = g * p64.norm() / (d64.norm() + eps) * d64
        vs.append(v)
        out.append(p64 + v)
    return out, vs


def _eq(a, b):
    return torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("backend,device", BD)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_matches_float64(backend, device, dtype):
    ps = rand_tensors(ODD_SHAPES, dtype)
    ds = rand_tensors(ODD_SHAPES, dtype, 1e-3)
    gammas = [0.01 * (i + 1) for i in range(len(ps))]
    ref, ref_v = _ref_perturb(ps, ds, gammas)
    work = on_device(ps, device)
    backups, deltas = poisoned(work), poisoned(work)
    dn = ops.perturb_(work, on_device(ds, device), gammas, backups=backups, deltas=deltas, backend=backend)
    for i, p in enumerate(ps):
        assert _eq(backups[i], p), "backup must be a bit-exact copy"
        assert rel_err(work[i], ref[i]) <= tol(dtype), (i, rel_err(work[i], ref[i]))
        if p.numel():
            assert rel_err(deltas[i], ref_v[i]) <= max(tol(dtype), 1e-6), i
    ref_dn = torch.stack([d.double().norm() for d in ds])
    assert rel_err(dn, ref_dn) <= max(tol(dtype), 1e-6)
    assert dn.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert dn.device.type == device


@pytest.mark.parametrize("backend,device", BD)
def test_perturb_relative_size_is_gamma(backend, device):
    ps = rand_tensors([(64, 3, 3, 3), (10, 64)], torch.float64)
    ds = rand_tensors([(64, 3, 3, 3), (10, 64)], torch.float64, 1e-4)
    work = on_device(ps, device)
    ops.perturb_(work, on_device(ds, device), 0.005, backend=backend)
    for p, w in zip(ps, work):
        assert abs((w.cpu() - p).norm() / p.norm() - 0.005) < 1e-12


@pytest.mark.parametrize("backend,device", BD)
def test_many_tensors_and_without_buffers(backend, device):
    shapes = [(int(s),) for s in torch.randint(0, 40, (1200,))]
    ps = rand_tensors(shapes, torch.float32)
    ds = rand_tensors(shapes, torch.float32)
    ref, _ = _ref_perturb(ps, ds, [0.02] * len(ps))
    work = on_device(ps, device)
    ops.perturb_(work, on_device(ds, device), 0.02, backend=backend)
    assert rel_err(torch.cat([w.cpu() for w in work]), torch.cat(ref)) <= 1e-6
    for w, r in zip(work, ref):
        assert rel_err(w, r) <= 1e-6
    ops.restore_(work, on_device(ps, device), backend=backend)
    assert all(_eq(w, p) for w, p in zip(work, ps))


@pytest.mark.parametrize("backend,device", BD)
@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_and_unperturb(backend, device, dtype):
    ps = rand_tensors(ODD_SHAPES, dtype)
    work = poisoned(on_device(ps, device))
    ops.restore_(work, on_device(ps, device), backend=backend)
    assert all(_eq(a, b) for a, b in zip(work, ps))
    vs = rand_tensors(ODD_SHAPES, dtype, 1e-2)
    ops.unperturb_(work, on_device(vs, device), backend=backend)
    for w, p, v in zip(work, ps, vs):
        assert rel_err(w, p.double() - v.double()) <= tol(dtype)


def _ref_project(w, v, gamma):
    r = gamma * w.double().norm()
    n = v.norm()
    return v * min(1.0, (r / n).item()) if n > 0 else v


@pytest.mark.parametrize("backend,device", BD)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ascent_step_and_project(backend, device, dtype):
    shapes = [(5, 7), (1,), (0,), (3, 3, 3, 3), (1025,)]
    w = rand_tensors(shapes, dtype)
    d = rand_tensors(shapes, dtype)
    v0 = rand_tensors(shapes, dtype, 1e-3)
    p = [(a.double() + b.double()).to(dtype) for a, b in zip(w, v0)]
    gam, eta = 0.01, 0.007
    exp = []
    for wi, pi, di in zip(w, p, d):
        v = pi.double() - wi.double() + eta * wi.double().norm() / (di.double().norm() + 1e-20) * di.double()
        exp.append(wi.double() + _ref_project(wi, v, gam))
    work = on_device(p, device)
    ops.ascent_step_(work, on_device(w, device), on_device(d, device), eta, gam, backend=backend)
    for i in range(len(shapes)):
        assert rel_err(work[i], exp[i]) <= tol(dtype), i
        if w[i].numel():  # inside the ball (up to rounding)
            vn = (work[i].cpu().double() - w[i].double()).norm() / w[i].double().norm()
            assert vn <= gam * (1 + 10 * tol(dtype)) + (1e-2 if dtype == torch.bfloat16 else 0)
    # project_: a perturbation far outside the ball is pulled back to its surface
    big = [(a.double() + 0.5 * torch.randn_like(a.double()) * a.double().norm() / max(a.numel(), 1) ** 0.5).to(dtype)
           for a in w]
    exp = [wi.double() + _ref_project(wi, bi.double() - wi.double(), gam) for wi, bi in zip(w, big)]
    work = on_device(big, device)
    ops.project_(work, on_device(w, device), gam, backend=backend)
    for i in range(len(shapes)):
        assert rel_err(work[i], exp[i]) <= tol(dtype), i


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


@pytest.mark.parametrize("backend,device", BD)
@pytest.mark.parametrize("norm,eps,alpha", [("Linf", 8 / 255, 2 / 255), ("L2", 0.5, 0.1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pgd_step(backend, device, norm, eps, alpha, dtype):
    x = torch.rand(5, 3, 7, 9, dtype=dtype)
    x_adv = torch.clamp(x + (torch.rand_like(x) * 2 - 1) * eps * 0.5, 0, 1)
    g = torch.randn_like(x)
    exp = _torchattacks_style_step(x_adv, g, x, alpha, eps, norm)
    out = x_adv.to(device)
    ops.pgd_step_(out, g.to(device), x.to(device), alpha, eps, norm, backend=backend)
    out = out.cpu()
    assert rel_err(out, exp) <= tol(dtype) * 10
    assert out.min() >= 0 and out.max() <= 1
    if norm == "Linf":
        assert (out - x).abs().max() <= eps + 1e-6
    else:
        assert (out - x).reshape(5, -1).norm(dim=1).max() <= eps * (1 + 1e-5)


@pytest.mark.parametrize("backend,device", BD)
def test_deterministic(backend, device):
    ps = rand_tensors([(33, 17), (4097,), (5,)], torch.float32, device=device)
    ds = rand_tensors([(33, 17), (4097,), (5,)], torch.float32, device=device)
    outs = []
    for _ in range(3):
        w = [p.clone() for p in ps]
        n = ops.perturb_(w, ds, 0.01, backend=backend)
        outs.append((w, n))
    for w, n in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(w, outs[0][0]))
        assert torch.equal(n, outs[0][1])


@pytest.mark.parametrize("backend,device", backend_device_params(
    ["reference", "foreach"] + (["native"] if "native" in CPU_BACKENDS else [])))
@pytest.mark.parametrize("dnorm", [1e-25, 3e-20])
def test_tiny_direction_norms(backend, device, dnorm):
    """||g|| far below the fp32 square's underflow: exact norms and v as in float64."""
    ps = rand_tensors([(300,), (7, 3)], torch.float32, device=device)
    ds = [(t / t.norm() * dnorm).float().to(device) for t in rand_tensors([(300,), (7, 3)], torch.float64)]
    vs = poisoned(ps)
    ref, ref_v = _ref_perturb([p.cpu() for p in ps], [d.cpu() for d in ds], [0.01, 0.01])
    dn = ops.perturb_([p.clone() for p in ps], ds, 0.01, deltas=vs, backend=backend)
    assert rel_err(dn, torch.tensor([dnorm, dnorm], dtype=torch.float64)) < 1e-6
    for v, r in zip(vs, ref_v):
        assert rel_err(v, r) < 1e-6
    assert rel_err(ops.norms(ds, backend=backend), torch.tensor([dnorm, dnorm], dtype=torch.float64)) < 1e-6


def _bias(out, ref):
    """Relative systematic error of ``out`` along ``ref``: <out - ref, ref> / ||ref||^2 (the
    part of the error that a mis-rounded per-tensor scale produces; element rounding noise
    averages out of it)."""
    out, ref = out.double().cpu().reshape(-1), ref.double().cpu().reshape(-1)
    return float((out - ref).dot(ref) / ref.dot(ref))


@pytest.mark.parametrize("backend,device", backend_device_params(["reference", "foreach"] +
                                                               (["native"] if "native" in CPU_BACKENDS else [])))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("expand", [None, True])
def test_low_precision_scale_is_not_rounded(backend, device, dtype, expand, monkeypatch):
    """bf16/fp16: the fp32 per-layer scale multiplies in fp32. Rounding it to the tensor dtype
    (what PyTorch's type promotion does for ``bf16 * fp32 0-dim``) biases every v_l by the
    scale's rounding error (here 0.23 % in bf16, 0.012 % in fp16); the measured bias must stay
    at the level of the elementwise rounding noise (< 3e-4 bf16, < 3e-5 fp16, n = 50 000).
    ``expand=True`` runs the foreach backend's CUDA code path (per-element scales) here too."""
    if expand and backend != "foreach":
        pytest.skip("EXPAND_SCALES only concerns the foreach backend")
    import awpfast.ops.foreach as F
    monkeypatch.setattr(F, "EXPAND_SCALES", expand)
    torch.manual_seed(3)
    n = 50000
    limit = 3e-4 if dtype == torch.bfloat16 else 3e-5
    # w small next to v, so that w + v holds v rounded once and the check is as sharp as on deltas
    w = (torch.randn(n, dtype=torch.float64) * 1e-5).to(dtype)
    d = torch.randn(n, dtype=torch.float64).to(dtype)
    wn, dn = w.double().norm(), d.double().norm()
    # a scale far from any bf16 / fp16 number, with a mantissa far from 1 (so that rounding the
    # products d * s is not systematic by itself)
    s_target = float(torch.tensor(1.3719 * 2.0 ** -7, dtype=torch.float32))
    gamma = float(s_target * (dn + 1e-20) / wn)
    v_ref = gamma * wn / (dn + 1e-20) * d.double()
    for keep_delta in (True, False):
        work = [w.to(device, copy=True)]
        deltas = poisoned(work) if keep_delta else None
        ops.perturb_(work, [d.to(device)], gamma, deltas=deltas, backend=backend)
        if keep_delta:
            assert abs(_bias(deltas[0], v_ref)) < limit, ("deltas", _bias(deltas[0], v_ref))
        got = work[0].double().cpu() - w.double()
        assert abs(_bias(got, v_ref)) < limit, ("params", keep_delta, _bias(got, v_ref))
    # add_scaled_ with the same fp32 scale as a device tensor, clipped and not
    scale = torch.tensor([s_target], dtype=torch.float32, device=device)
    for clip in (None, 10.0):
        work, deltas = [w.to(device, copy=True)], [torch.full_like(w, float("nan")).to(device)]
        ops.add_scaled_(work, [d.to(device)], scale, clip=clip, deltas=deltas, backend=backend)
        assert abs(_bias(deltas[0], s_target * d.double())) < limit, ("add_scaled_", clip)
        assert abs(_bias(work[0].double().cpu() - w.double(), s_target * d.double())) < limit


def test_foreach_calls_keep_the_multi_tensor_fast_path(monkeypatch):
    """Every torch._foreach_* call of the foreach backend pairs tensors of equal shape and
    strides (and dtype, except in copies): PyTorch's multi-tensor fast path. A list of 0-dim
    per-tensor scales would send each call down the per-tensor slow path on CUDA."""
    import awpfast.ops.foreach as F
    monkeypatch.setattr(F, "EXPAND_SCALES", True)  # the CUDA code path
    seen = []

    def wrap(name, fn):
        def check(*args, **kw):
            lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
            for other in lists[1:]:
                for x, y in zip(lists[0], other):
                    assert x.shape == y.shape and (x.numel() <= 1 or x.stride() == y.stride()), \
                        f"{name}: {tuple(x.shape)}/{x.stride()} with {tuple(y.shape)}/{y.stride()}"
                    if name != "_foreach_copy_":
                        assert x.dtype == y.dtype, f"{name}: {x.dtype} with {y.dtype}"
            seen.append(name)
            return fn(*args, **kw)
        return check

    for name in dir(torch):
        if name.startswith("_foreach_") and name != "_foreach_norm":
            monkeypatch.setattr(torch, name, wrap(name, getattr(torch, name)))
    shapes = [(6, 3, 3, 3), (40,), (0,), (1,), (10, 6)]
    import awpfast.ops.reference as R

    def sequence(M, ps, ds, cl):
        bs, vs = [torch.empty_like(p) for p in ps], [torch.empty_like(p) for p in ps]
        out = [M.perturb_(ps, ds, [0.01, 0.02, 0.03, 0.04, 0.05], 1e-20, bs, vs)]
        out.append(M.perturb_(cl, [d.contiguous() for d in ds], [0.01] * 5, 1e-20, None, None))
        out += [p.clone() for p in ps] + [v.clone() for v in vs] + [c.clone() for c in cl]
        M.unperturb_(ps, vs)
        out += [p.clone() for p in ps]
        out.append(M.ascent_step_(ps, bs, ds, [0.01] * 5, [0.02, 0.01, 0.02, 0.01, 0.02], 1e-20))
        out += [p.clone() for p in ps]
        M.project_(ps, bs, [0.005] * 5)
        out += [p.clone() for p in ps]
        M.add_scaled_(ps, ds, torch.rand(5, generator=torch.Generator().manual_seed(0)), 0.5, None, bs, vs)
        out += [p.clone() for p in ps] + [v.clone() for v in vs]
        M.add_scaled_(ps, ds, [0.1, 0.2, 0.3, 0.4, 0.5], None, bs, None, None)
        out += [p.clone() for p in ps]
        M.restore_(ps, bs)
        out += [p.clone() for p in ps]
        return out

    for dt in (torch.float32, torch.bfloat16):
        ps, ds = rand_tensors(shapes, dt), rand_tensors(shapes, dt, 1e-2)
        ps[0] = ps[0].contiguous(memory_format=torch.channels_last)
        ds[0] = ds[0].contiguous(memory_format=torch.channels_last)
        got = sequence(F, [p.clone() for p in ps], ds, [p.contiguous().clone() for p in ps])
        seen_now = len(seen)
        want = sequence(R, [p.clone() for p in ps], ds, [p.contiguous().clone() for p in ps])
        del seen[seen_now:]
        for i, (a, b) in enumerate(zip(got, want)):
            assert rel_err(a, b) <= (2e-6 if dt == torch.float32 else 1e-2), (dt, i)
    assert "_foreach_addcmul_" in seen and "_foreach_mul_" in seen


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


def test_public_functions_have_docstrings():
    """help(awpfast.ops.perturb_) and friends say what they do."""
    import inspect
    for name in ops.__all__:
        obj = getattr(ops, name)
        if callable(obj):
            doc = inspect.getdoc(obj) or ""
            assert len(doc) > 40, name
            if name.endswith("_") or name == "norms":
                assert "backend" in doc, name


def test_every_backend_implements_every_op():
    """One table (awpfast.ops._spec) names the ops; every backend module has a group function
    for each (no backend falls back to another for an op), and the public functions are
    derived from the table: signature, docstring, ``backend`` keyword-only at the end."""
    import importlib
    import inspect
    from awpfast.ops import _spec
    for name in ops.BACKENDS:
        try:
            mod = importlib.import_module(f"awpfast.ops.{name}")
        except ImportError:  # triton not installed
            continue
        for op in _spec.NAMES:
            assert callable(getattr(mod, op, None)), (name, op)
    for op in _spec.OPS:
        sig = inspect.signature(getattr(ops, op.name))
        assert list(sig.parameters) == [a.name for a in op.args] + ["backend"], op.name
        assert sig.parameters["backend"].kind == inspect.Parameter.KEYWORD_ONLY
        assert op.doc.split()[0] in inspect.getdoc(getattr(ops, op.name))
    assert set(ops.__all__) >= set(_spec.NAMES)


def test_seam_ops_want_every_op():
    from awpfast.ops import _library, _spec
    impls = {n: (lambda *a: None) for n in _spec.NAMES if n != "box_perturb_"}
    with pytest.raises(ValueError, match="box_perturb_"):
        _library.SeamOps("test_", impls, register=False)
