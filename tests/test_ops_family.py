"""The family ops (``global_sqnorm``, ``asam_apply_``, ``box_perturb_``) of every backend
against independent float64 formulas: fresh random inputs, poisoned outputs, odd sizes
(empty, 1-element, BLOCK +- 1, 1,000+ tensors), mixed dtypes, determinism."""

import math

import pytest
import torch

import awpfast.ops as ops
from conftest import many_mixed, poisoned, rand_tensors, rel_err, tol

BACKENDS = [b for b in ops.BACKENDS if b in ops.available_backends()]
# 1,000+ tensors: the Triton CPU interpreter needs ~10 s per launch of 1,000 programs, so the
# many-tensor tests leave it out without CUDA (as test_ops.py does); test_kernels_family.py
# runs Triton with 1,000+ tensors.
MANY_BACKENDS = [b for b in BACKENDS if b != "triton" or torch.cuda.is_available()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ODD_SHAPES = [(3, 5), (1,), (0,), (7, 3, 3, 3), (1023,), (1025,), (4097,), (2, 1, 1)]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- formulas (float64)
def _sqnorm64(ts, ws=None, eta=0.0):
    total = 0.0
    for i, t in enumerate(ts):
        x = t.double()
        if ws is not None:
            x = (ws[i].double().abs() + eta) * x
        total += float((x * x).sum())
    return total


def _asam64(ps, ds, scales, eta):
    return [p.double() + s * (p.double().abs() + eta) ** 2 * d.double() for p, d, s in zip(ps, ds, scales)]


def _box64(ps, ds, lr, ae, origins, eps=1e-6, norms=None):
    """The notebook's per-tensor step: r = lr * g / (||g|| + e) * (||w|| + e), w += r, then
    w = min(max(w, o - ae|o|), o + ae|o|); tensors with ||g|| == 0 or non-finite untouched."""
    out, dns = [], []
    for i, (p, d, o) in enumerate(zip(ps, ds, origins)):
        p64, d64, o64 = p.double(), d.double(), o.double()
        gn = d64.norm() if norms is None else norms[0][i].double()
        wn = p64.norm() if norms is None else norms[1][i].double()
        dns.append(float(gn))
        if float(gn) == 0.0 or not math.isfinite(float(gn)):
            out.append(p64)
            continue
        new = p64 + lr * d64 / (gn + eps) * (wn + eps)
        out.append(torch.min(torch.max(new, o64 - ae * o64.abs()), o64 + ae * o64.abs()))
    return out, dns


# ----------------------------------------------------------------------------- global_sqnorm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_global_sqnorm_matches_float64(backend, dtype, weighted, eta):
    ts = rand_tensors(ODD_SHAPES, dtype)
    ws = rand_tensors(ODD_SHAPES, dtype) if weighted else None
    out = ops.global_sqnorm(ts, weights=ws, eta=eta, backend=backend)
    assert out.dim() == 0 and out.dtype == _acc(dtype) and out.device == ts[0].device
    ref = _sqnorm64(ts, ws, eta)
    assert abs(float(out) - ref) / ref <= max(tol(dtype), 1e-6), (float(out), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_sqnorm_nonfinite_and_empty(backend):
    ts = rand_tensors([(5,), (3, 2)], torch.float32)
    ts[1][1, 1] = float("nan")
    assert torch.isnan(ops.global_sqnorm(ts, backend=backend))
    ts[1][1, 1] = float("inf")
    assert not torch.isfinite(ops.global_sqnorm(ts, backend=backend))
    assert float(ops.global_sqnorm([], backend=backend)) == 0.0
    z = ops.global_sqnorm([torch.empty(0), torch.empty(0, 3)], backend=backend)
    assert z.dim() == 0 and float(z) == 0.0


def test_global_sqnorm_many_tensors_mixed_dtypes_deterministic():
    shapes = [(int(s),) for s in torch.randint(0, 40, (1100,))]
    dts = [(torch.float32, torch.float64, torch.bfloat16)[i % 3] for i in range(len(shapes))]
    ts = [torch.randn(s, dtype=torch.float64).to(dt) for s, dt in zip(shapes, dts)]
    ws = [torch.randn(s, dtype=torch.float64).to(dt) for s, dt in zip(shapes, dts)]
    for backend in MANY_BACKENDS:
        a = ops.global_sqnorm(ts, weights=ws, eta=0.05, backend=backend)
        b = ops.global_sqnorm(ts, weights=ws, eta=0.05, backend=backend)
        assert a.dtype == torch.float64  # one float64 input makes the result float64
        assert torch.equal(a, b), "the same inputs must give the same bits"
        ref = _sqnorm64(ts, ws, 0.05)
        assert abs(float(a) - ref) / ref <= 1e-5


def test_global_sqnorm_weights_of_another_dtype_and_errors():
    ts = rand_tensors([(4, 3), (6,)], torch.float32)
    ws = rand_tensors([(4, 3), (6,)], torch.float64)
    out = ops.global_sqnorm(ts, weights=ws, eta=0.1)
    assert abs(float(out) - _sqnorm64(ts, ws, 0.1)) / float(out) <= 1e-6
    with pytest.raises(ValueError, match="shape"):
        ops.global_sqnorm(ts, weights=ws[::-1])
    with pytest.raises(ValueError, match="eta"):
        ops.global_sqnorm(ts, weights=ws, eta=-1.0)
    with pytest.raises(TypeError, match="list of tensors"):
        ops.global_sqnorm(ts[0])


# ----------------------------------------------------------------------------- asam_apply_
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_asam_apply_matches_float64(backend, dtype, eta):
    ps = rand_tensors(ODD_SHAPES, dtype)
    ds = rand_tensors(ODD_SHAPES, dtype)
    scales = (torch.rand(len(ps), dtype=torch.float64) * 0.2 + 0.05).to(_acc(dtype))
    ref = _asam64(ps, ds, scales.tolist(), eta)
    work, backups = [p.clone() for p in ps], poisoned(ps)
    ops.asam_apply_(work, ds, scales, eta=eta, backups=backups, backend=backend)
    for i, p in enumerate(ps):
        assert torch.equal(backups[i], p), "backup must be a bit-exact copy of the weights before the write"
        assert rel_err(work[i], ref[i]) <= tol(dtype), (i, rel_err(work[i], ref[i]))
        if p.numel() > 8:  # (a 1-element bf16 weight may round back to itself)
            assert not torch.equal(work[i], p), "the perturbation must move the weights"


@pytest.mark.parametrize("backend", BACKENDS)
def test_asam_apply_scale_forms_and_no_backup(backend):
    ps = rand_tensors(ODD_SHAPES, torch.float32)
    ds = rand_tensors(ODD_SHAPES, torch.float32)
    for scale in (0.3, [0.01 * (i + 1) for i in range(len(ps))], torch.tensor(0.25)):
        s_list = scale if isinstance(scale, list) else [float(scale)] * len(ps)
        ref = _asam64(ps, ds, s_list, 0.02)
        work = [p.clone() for p in ps]
        ops.asam_apply_(work, ds, scale, eta=0.02, backend=backend)
        for w, r in zip(work, ref):
            assert rel_err(w, r) <= 1e-6
    # eta = 0 and w = 0: T = 0, so the weight does not move (davda54's adaptive SAM)
    zero = [torch.zeros(5)]
    ops.asam_apply_(zero, [torch.randn(5)], 1.0, backend=backend)
    assert torch.equal(zero[0], torch.zeros(5))


def test_asam_apply_many_tensors_mixed_dtypes_deterministic():
    ps, ds = many_mixed()
    scales = torch.rand(len(ps), dtype=torch.float64)
    ref = _asam64(ps, ds, scales.tolist(), 0.01)
    for backend in MANY_BACKENDS:
        a, b = [p.clone() for p in ps], [p.clone() for p in ps]
        ops.asam_apply_(a, ds, scales, eta=0.01, backend=backend)
        ops.asam_apply_(b, ds, scales, eta=0.01, backend=backend)
        for x, y, r, p in zip(a, b, ref, ps):
            assert torch.equal(x, y)
            assert rel_err(x, r) <= tol(p.dtype) * 10


def test_asam_apply_errors():
    ps = rand_tensors([(3,), (4,)], torch.float32)
    ds = rand_tensors([(3,), (4,)], torch.float32)
    with pytest.raises(ValueError, match="one value per tensor"):
        ops.asam_apply_(ps, ds, torch.ones(3))
    with pytest.raises(ValueError, match="eta"):
        ops.asam_apply_(ps, ds, 1.0, eta=float("inf"))
    with pytest.raises(ValueError, match="finite"):
        ops.asam_apply_(ps, ds, float("nan"))
    with pytest.raises(ValueError, match="backups"):
        ops.asam_apply_(ps, ds, 1.0, backups=ps[:1])
    ops.asam_apply_([], [], 1.0)  # nothing to do


# ----------------------------------------------------------------------------- box_perturb_
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adv_lr", [0.05, 1.0])
def test_box_perturb_first_step_matches_notebook_formula(backend, dtype, adv_lr):
    ps = rand_tensors(ODD_SHAPES, dtype)
    ds = rand_tensors(ODD_SHAPES, dtype, 1e-3)
    ref, ref_dn = _box64(ps, ds, adv_lr, 0.2, ps)
    work, origins = [p.clone() for p in ps], poisoned(ps)
    dn = ops.box_perturb_(work, ds, adv_lr, 0.2, origins, first=True, backend=backend)
    assert dn.dtype == _acc(dtype) and dn.shape == (len(ps),)
    assert rel_err(dn, torch.tensor(ref_dn)) <= max(tol(dtype), 1e-6)
    clamped = 0
    for i, p in enumerate(ps):
        assert torch.equal(origins[i], p), "origins must be a bit-exact copy"
        assert rel_err(work[i], ref[i]) <= tol(dtype), (i, rel_err(work[i], ref[i]))
        p64 = p.double()
        clamped += int(((ref[i] - p64).abs() >= 0.2 * p64.abs() * (1 - 1e-9)).sum()) if p.numel() else 0
    if adv_lr == 1.0:
        assert clamped > 0, "adv_lr=1 must hit the box (the test would not check the clamp)"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_box_perturb_later_steps_use_current_weights_and_keep_origins(backend, dtype):
    ps = rand_tensors(ODD_SHAPES, dtype)
    d1, d2 = rand_tensors(ODD_SHAPES, dtype), rand_tensors(ODD_SHAPES, dtype)
    work, origins = [p.clone() for p in ps], poisoned(ps)
    ops.box_perturb_(work, d1, 0.1, 0.3, origins, first=True, backend=backend)
    mid = [w.clone() for w in work]
    frozen = [o.clone() for o in origins]
    ref, _ = _box64(mid, d2, 0.1, 0.3, ps)      # ||w|| of the current (perturbed) weights, box around w0
    ops.box_perturb_(work, d2, 0.1, 0.3, origins, first=False, backend=backend)
    for i in range(len(ps)):
        assert torch.equal(origins[i], frozen[i]), "first=False must not touch the origins"
        assert rel_err(work[i], ref[i]) <= tol(dtype), (i, rel_err(work[i], ref[i]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_box_perturb_skips_zero_and_nonfinite_directions(backend):
    ps = rand_tensors([(4, 3), (6,), (5,), (7,), (2, 2)], torch.float32)
    ds = rand_tensors([(4, 3), (6,), (5,), (7,), (2, 2)], torch.float32)
    ds[1].zero_()
    ds[2][3] = float("nan")
    ds[3][0] = float("inf")
    work, origins = [p.clone() for p in ps], poisoned(ps)
    dn = ops.box_perturb_(work, ds, 1.0, 0.2, origins, first=True, backend=backend)
    for i in (1, 2, 3):
        assert torch.equal(work[i], ps[i]), f"tensor {i} must be left unchanged"
    for i in (0, 4):
        assert torch.isfinite(work[i]).all() and not torch.equal(work[i], ps[i])
    assert float(dn[1]) == 0.0 and math.isnan(float(dn[2])) and math.isinf(float(dn[3]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_box_perturb_with_given_norms_and_per_tensor_sizes(backend):
    ps = rand_tensors(ODD_SHAPES, torch.float64)
    ds = rand_tensors(ODD_SHAPES, torch.float64)
    n = len(ps)
    given = (torch.rand(n, dtype=torch.float64) + 0.5, torch.rand(n, dtype=torch.float64) + 0.5)
    given[0][2] = 0.0  # skipped by its given norm
    lrs = [0.01 * (i + 1) for i in range(n)]
    aes = [0.05 * (i + 1) for i in range(n)]
    work, origins = [p.clone() for p in ps], poisoned(ps)
    dn = ops.box_perturb_(work, ds, lrs, aes, origins, first=True, norms=given, backend=backend)
    assert torch.equal(dn, given[0])
    for i, p in enumerate(ps):
        ref, _ = _box64([p], [ds[i]], lrs[i], aes[i], [p], norms=(given[0][i:i + 1], given[1][i:i + 1]))
        assert rel_err(work[i], ref[0]) <= 1e-12, i


def test_box_perturb_many_tensors_mixed_dtypes_deterministic():
    ps, ds = many_mixed()
    ref, ref_dn = _box64(ps, ds, 0.5, 0.1, ps)
    for backend in MANY_BACKENDS:
        a, b = [p.clone() for p in ps], [p.clone() for p in ps]
        oa, ob = poisoned(ps), poisoned(ps)
        na = ops.box_perturb_(a, ds, 0.5, 0.1, oa, first=True, backend=backend)
        nb = ops.box_perturb_(b, ds, 0.5, 0.1, ob, first=True, backend=backend)
        assert torch.equal(na, nb) and na.dtype == torch.float64 and na.shape == (len(ps),)
        assert rel_err(na, torch.tensor(ref_dn)) <= 1e-6
        for x, y, r, p, o in zip(a, b, ref, ps, oa):
            assert torch.equal(x, y) and torch.equal(o, p)
            assert rel_err(x, r) <= tol(p.dtype) * 10


def test_box_perturb_errors():
    ps = rand_tensors([(3,), (4,)], torch.float32)
    ds = rand_tensors([(3,), (4,)], torch.float32)
    os_ = poisoned(ps)
    with pytest.raises(TypeError, match="first"):
        ops.box_perturb_(ps, ds, 1.0, 0.2, os_, first=1)
    with pytest.raises(ValueError, match="adv_lr"):
        ops.box_perturb_(ps, ds, -1.0, 0.2, os_, first=True)
    with pytest.raises(ValueError, match="adv_eps"):
        ops.box_perturb_(ps, ds, 1.0, [0.2], os_, first=True)
    with pytest.raises(ValueError, match="origins"):
        ops.box_perturb_(ps, ds, 1.0, 0.2, os_[:1], first=True)
    with pytest.raises(ValueError, match="norms"):
        ops.box_perturb_(ps, ds, 1.0, 0.2, os_, first=True, norms=(torch.ones(2),))
    assert ops.box_perturb_([], [], 1.0, 0.2, [], first=True).numel() == 0


def test_foreach_expanded_scales_path(monkeypatch):
    """The foreach backend's CUDA code path (per-tensor scales expanded per element), run on
    the CPU: the same results as the formulas."""
    import awpfast.ops.foreach as F
    monkeypatch.setattr(F, "EXPAND_SCALES", True)
    ps = rand_tensors(ODD_SHAPES, torch.float32)
    ds = rand_tensors(ODD_SHAPES, torch.float32)
    scales = torch.rand(len(ps)) * 0.2 + 0.05
    work = [p.clone() for p in ps]
    ops.asam_apply_(work, ds, scales, eta=0.01, backend="foreach")
    for w, r in zip(work, _asam64(ps, ds, scales.tolist(), 0.01)):
        assert rel_err(w, r) <= 1e-6
    lrs = [0.1 * (i + 1) for i in range(len(ps))]
    ds[2] = torch.full_like(ds[2], float("nan"))
    work, origins = [p.clone() for p in ps], poisoned(ps)
    ops.box_perturb_(work, ds, lrs, [0.1] * len(ps), origins, first=True, backend="foreach")
    for i, p in enumerate(ps):
        ref, _ = _box64([p], [ds[i]], lrs[i], 0.1, [p])
        assert rel_err(work[i], ref[0]) <= 1e-6, i

