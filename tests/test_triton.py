"""The Triton backend against the float64 reference (design brief section 4).

Without CUDA the kernels run on the Triton CPU interpreter (TRITON_INTERPRET=1, set here
before Triton is imported; if another test module imported the backend first, the backend's
test hook re-decorates the kernels for the interpreter). With CUDA the same tests run the
compiled kernels. Sizes are tiny and the chunking is shrunk (BLOCK=32, CHUNK=64, MAXK=4) so
that odd sizes, multi-chunk tensors and the long-chunk rule are all exercised cheaply.
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="the triton backend needs the triton package")

import awpfast.ops as ops  # noqa: E402
from awpfast.ops import reference as R  # noqa: E402
from awpfast.ops import triton as T  # noqa: E402
from conftest import rel_err, tol  # noqa: E402

if not CUDA:
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is set to something other than 1", allow_module_level=True)
    T._use_interpreter()
    getattr(ops, "_loaded", {}).pop("triton", None)  # let the seam re-check availability

if not T.available()[0]:
    pytest.skip(f"triton backend unavailable: {T.available()[1]}", allow_module_level=True)

DEV = torch.device("cuda" if CUDA else "cpu")
LOW = [torch.float32, torch.bfloat16, torch.float16]
PROD = dict(T.CONFIG)  # the shipped settings, before any test changes them
SMALL = dict(BLOCK=32, CHUNK=64, MAXK=4, KB=4, PGD_BLOCK=64, L2_BLOCK=32)
# BLOCK-1, BLOCK, BLOCK+1, one element, empty, > one chunk (65, 189), > MAXK*CHUNK (300)
ODD = [(3, 5), (1,), (0,), (31,), (32,), (33,), (7, 3, 3, 3), (65,), (300,), (2, 1, 1)]


@pytest.fixture(autouse=True)
def _small_chunks():
    old = T.set_config(**SMALL)
    yield
    T.set_config(**old)


def _rand(shapes, dtype, scale=1.0):
    return [(torch.randn(s, dtype=torch.float64) * scale).to(device=DEV, dtype=dtype) for s in shapes]


def _nan(ts):
    return [torch.full_like(t, float("nan")) for t in ts]


def _up(ts):
    return [t.detach().double().cpu().clone() for t in ts]


def _cat(ts):
    return torch.cat([t.reshape(-1).double().cpu() for t in ts])


def _gammas(n, per_tensor, base=0.01):
    return [base * (1 + (i % 5)) for i in range(n)] if per_tensor else [base] * n


# --------------------------------------------------------------------------- capability
def test_capabilities():
    assert T.available() == (True, "")
    assert T.supports(DEV, torch.float32) and T.supports(DEV, torch.bfloat16) and T.supports(DEV, torch.float16)
    assert not T.supports(DEV, torch.float64), "float64 must fall back to foreach"
    assert T.supports_device(torch.device("cuda"))
    assert "triton" in ops.available_backends()
    assert ops.get_backend("triton", DEV, torch.float64).__name__.endswith("foreach")


# --------------------------------------------------------------------------- weight-side ops
@pytest.mark.parametrize("dtype", LOW)
def test_norms(dtype):
    ts = _rand(ODD, dtype)
    out = T.norms(ts)
    assert out.dtype == torch.float32 and out.shape == (len(ts),) and out.device.type == DEV.type
    ref = R.norms(_up(ts))
    assert rel_err(out, ref) < 1e-6
    assert out[ODD.index((0,))].item() == 0.0
    seam = ops.norms(ts, backend="triton")
    assert torch.equal(seam, out)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("keep", ["both", "backup", "delta", "none"])
def test_perturb(dtype, per_tensor, keep):
    ps, ds = _rand(ODD, dtype), _rand(ODD, dtype, 1e-3)
    orig = [p.clone() for p in ps]
    gam = _gammas(len(ps), per_tensor)
    bs = _nan(ps) if keep in ("both", "backup") else None
    vs = _nan(ps) if keep in ("both", "delta") else None
    dn = T.perturb_(ps, ds, gam, 1e-20, bs, vs)
    rp, rv = _up(orig), [torch.empty(s, dtype=torch.float64) for s in ODD]
    rdn = R.perturb_(rp, _up(ds), gam, 1e-20, None, rv)
    assert rel_err(dn, rdn) < 1e-6
    assert rel_err(_cat(ps), _cat(rp)) < tol(dtype)
    # the perturbation itself (small next to w) must be right too, not just w + v (in bf16 the
    # rounding of w + v alone is about 1/3 of v, so only fp32 and fp16 can check this)
    if dtype != torch.bfloat16:
        assert rel_err(_cat(ps) - _cat(orig), _cat(rv)) < (1e-4 if dtype == torch.float32 else 1.5e-1)
    if vs is not None:
        assert rel_err(_cat(vs), _cat(rv)) < tol(dtype)
    if bs is not None:
        assert all(torch.equal(b, o) for b, o in zip(bs, orig)), "backup must be bit-exact"
    # ||v|| = gamma ||w|| per layer
    for i, (o, g) in enumerate(zip(orig, gam)):
        if o.numel() > 1:
            vn = (ps[i].double() - o.double()).norm().item() if dtype == torch.float32 else rv[i].norm().item()
            assert abs(vn - g * o.double().norm().item()) <= 1e-3 * g * o.double().norm().item() + 1e-12


@pytest.mark.parametrize("dtype", LOW)
def test_restore_and_unperturb(dtype):
    ps, ds = _rand(ODD, dtype), _rand(ODD, dtype)
    orig = [p.clone() for p in ps]
    bs, vs = _nan(ps), _nan(ps)
    T.perturb_(ps, ds, 0.05, 1e-20, bs, vs)
    pert = [p.clone() for p in ps]
    for p in ps:
        p.fill_(float("nan"))
    T.restore_(ps, bs)
    assert all(torch.equal(p, o) for p, o in zip(ps, orig)), "restore must be bit-exact"
    ps = [p.clone() for p in pert]
    T.unperturb_(ps, vs)
    ref = [p - v for p, v in zip(_up(pert), _up(vs))]
    assert rel_err(_cat(ps), _cat(ref)) < tol(dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_ascent_step(dtype, per_tensor):
    w = _rand(ODD, dtype)
    ds = _rand(ODD, dtype, 1e-2)
    # start inside / outside the ball depending on the layer, so the projection both binds and not
    p0 = [(wi.double() + torch.randn(wi.shape, dtype=torch.float64, device=DEV) * (0.002 * (1 + i % 4)))
          .to(dtype) for i, wi in enumerate(w)]
    gam = _gammas(len(w), per_tensor, 0.005)
    steps = [g * 0.5 for g in gam]
    ps = [p.clone() for p in p0]
    dn = T.ascent_step_(ps, w, ds, steps, gam, 1e-20)
    rp = _up(p0)
    rdn = R.ascent_step_(rp, _up(w), _up(ds), steps, gam, 1e-20)
    assert rel_err(dn, rdn) < 1e-6
    assert rel_err(_cat(ps), _cat(rp)) < tol(dtype)
    if dtype == torch.float32:  # the perturbation v = p - w, not only p
        assert rel_err(_cat(ps) - _cat(w), _cat(rp) - _cat(w)) < 1e-4
        for p, wi, g in zip(ps, w, gam):  # inside the ball afterwards
            assert (p.double() - wi.double()).norm() <= g * wi.double().norm() * (1 + 1e-5) + 1e-12


def test_ascent_steps_repeated_fp32():
    w = _rand(ODD, torch.float32)
    ps = [x.clone() for x in w]
    rp = _up(w)
    for k in range(3):
        ds = _rand(ODD, torch.float32)
        T.ascent_step_(ps, w, ds, 0.004, 0.01, 1e-20)
        R.ascent_step_(rp, _up(w), _up(ds), [0.004] * len(w), [0.01] * len(w), 1e-20)
    assert rel_err(_cat(ps) - _cat(w), _cat(rp) - _cat(w)) < 1e-4


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_project(dtype, per_tensor):
    w = _rand(ODD, dtype)
    p0 = [(wi.double() + torch.randn(wi.shape, dtype=torch.float64, device=DEV) * (0.003 * (1 + i % 3)))
          .to(dtype) for i, wi in enumerate(w)]
    gam = _gammas(len(w), per_tensor, 0.004)
    ps = [p.clone() for p in p0]
    T.project_(ps, w, gam)
    rp = _up(p0)
    R.project_(rp, _up(w), gam)
    assert rel_err(_cat(ps), _cat(rp)) < tol(dtype)
    if dtype == torch.float32:
        assert rel_err(_cat(ps) - _cat(w), _cat(rp) - _cat(w)) < 1e-4


# about 30 s in the Triton interpreter (1,103 tensors in one call): make test-all; make test keeps
# test_kernels_family's 1,004-tensor one-call test (triton-cpu)
@pytest.mark.slow
def test_many_tensors_one_call():
    torch.manual_seed(0)
    shapes = [(int(n),) for n in torch.randint(1, 40, (1100,))] + [(0,), (1,), (129,)]
    ps, ds = _rand(shapes, torch.float32), _rand(shapes, torch.float32)
    orig = [p.clone() for p in ps]
    bs = _nan(ps)
    gam = [0.001 * (1 + i % 7) for i in range(len(ps))]
    dn = T.perturb_(ps, ds, gam, 1e-20, bs, None)
    rp = _up(orig)
    rdn = R.perturb_(rp, _up(ds), gam, 1e-20, None, None)
    assert rel_err(dn, rdn) < 1e-6
    assert rel_err(_cat(ps) - _cat(orig), _cat(rp) - _cat(orig)) < 1e-4
    T.restore_(ps, bs)
    assert all(torch.equal(p, o) for p, o in zip(ps, orig))


def test_default_config_multi_chunk():
    """Production chunking: a tensor of several chunks next to small ones."""
    T.set_config(**PROD)
    shapes = [(65536 * 2 + 1025,), (1023,), (5,)]
    ps, ds = _rand(shapes, torch.float32), _rand(shapes, torch.float32)
    orig = [p.clone() for p in ps]
    dn = T.perturb_(ps, ds, 0.01, 1e-20, None, None)
    rp = _up(orig)
    rdn = R.perturb_(rp, _up(ds), [0.01] * 3, 1e-20, None, None)
    assert rel_err(dn, rdn) < 1e-6
    assert rel_err(_cat(ps) - _cat(orig), _cat(rp) - _cat(orig)) < 1e-4


def test_deterministic():
    ps, ds = _rand(ODD, torch.bfloat16), _rand(ODD, torch.bfloat16)
    outs = []
    for _ in range(2):
        p = [x.clone() for x in ps]
        dn = T.perturb_(p, ds, [0.01] * len(p), 1e-20, None, None)
        dn2 = T.ascent_step_(p, ps, ds, 0.003, 0.004, 1e-20)
        outs.append((dn, dn2, T.norms(p), p))
    (a, b, c, p), (a2, b2, c2, p2) = outs
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(c, c2)
    assert all(torch.equal(x, y) for x, y in zip(p, p2))


# --------------------------------------------------------------------------- tiny and huge norms
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dnorm", [1e-25, 3e-20, 1e-12])
def test_tiny_direction_norms(dtype, dnorm):
    """||g|| far below the fp32 square's underflow (~1e-19) and near eps = 1e-20: the norm
    must be exact (not flushed to 0) and v = gamma ||w|| g / (||g|| + eps) as in float64."""
    shapes = [(64, 3, 3), (1000,), (7,)]
    ps = _rand(shapes, dtype)
    ds = [(torch.randn(s, dtype=torch.float64) / (torch.tensor(s).prod().item() ** 0.5) * dnorm).to(DEV, dtype)
          for s in shapes]
    orig = [p.clone() for p in ps]
    vs = _nan(ps)
    dn = T.perturb_(ps, ds, [0.01] * 3, 1e-20, None, vs)
    rp, rv = _up(orig), [torch.empty(s, dtype=torch.float64) for s in shapes]
    rdn = R.perturb_(rp, _up(ds), [0.01] * 3, 1e-20, None, rv)
    assert (dn > 0).all() and rel_err(dn, rdn) < 1e-6, (dn, rdn)
    assert rel_err(T.norms(ds), rdn) < 1e-6
    assert rel_err(_cat(vs), _cat(rv)) < tol(dtype)
    for v, w, d in zip(vs, orig, ds):  # ||v|| follows the formula (about 0.75 gamma ||w|| at 3e-20)
        g = d.double().norm()
        want = 0.01 * w.double().norm() * g / (g + 1e-20)
        assert abs(v.double().norm() / want - 1) < (1e-5 if dtype == torch.float32 else 1e-2)
    # the multi-step ascent: tiny directions too
    w = _rand(shapes, torch.float32)
    q = [x.clone() for x in w]
    dn2 = T.ascent_step_(q, w, [d.float() for d in ds], 0.004, 0.01, 1e-20)
    rq = _up(w)
    rdn2 = R.ascent_step_(rq, _up(w), _up(ds), [0.004] * 3, [0.01] * 3, 1e-20)
    assert rel_err(dn2, rdn2) < 1e-6
    if dnorm >= 3e-20:  # below, v is under half an fp32 ulp of w and w + v rounds to w
        assert rel_err(_cat(q) - _cat(w), _cat(rq) - _cat(w)) < 1e-4


def test_huge_values_do_not_overflow_the_squares():
    """Elements of 1e20 (squares overflow fp32) still give finite, exact norms."""
    xs = [torch.randn(300, dtype=torch.float64).mul(1e20).float().to(DEV), torch.randn(5).mul(1e30).to(DEV)]
    out = T.norms(xs)
    assert torch.isfinite(out).all()
    assert rel_err(out, R.norms(_up(xs))) < 1e-6


# --------------------------------------------------------------------------- capture and tables
@pytest.fixture
def simulate_capture(monkeypatch):
    """Run the launch path as inside a CUDA-graph capture (on the interpreter too)."""
    monkeypatch.setattr(T, "SIMULATE_CAPTURE", True)


def _cache_sizes():
    return len(T._ptr_tables.d), len(T._float_tables.d)


def test_fill_kernel_builds_any_int64_table():
    """The capture-time table builder writes exactly the values (pointers, negative numbers,
    float64 bit patterns, more than one launch's worth)."""
    vals = [0, 1, -1, 2 ** 63 - 1, -(2 ** 63), 0x7F12_3456_7890, 12345] + T._f64_bits([0.01, -3.5e-300, 1e300])
    vals += list(range(100, 113))  # 23 values: 3 launches of 8
    ctx = T._Ctx(DEV)
    got = T._device_table(vals, ctx)
    assert got.dtype == torch.int64 and got.cpu().tolist() == vals


def test_capture_path_builds_tables_without_caching(simulate_capture):
    """Tensors never seen before (as autograd.grad outputs inside a capture): the tables are
    built by kernels for this call only; results equal the reference; nothing is cached."""
    T.clear_cache()
    ps, ds = _rand(ODD, torch.float32), _rand(ODD, torch.float32, 1e-3)
    orig = [p.clone() for p in ps]
    gam = _gammas(len(ps), True)
    bs = _nan(ps)
    before = _cache_sizes()
    dn = T.perturb_(ps, ds, gam, 1e-20, bs, None)
    assert _cache_sizes() == before, "tables built during a capture must not enter the caches"
    rp = _up(orig)
    rdn = R.perturb_(rp, _up(ds), gam, 1e-20, None, None)
    assert rel_err(dn, rdn) < 1e-6 and rel_err(_cat(ps) - _cat(orig), _cat(rp) - _cat(orig)) < 1e-4
    assert all(torch.equal(b, o) for b, o in zip(bs, orig))
    w = [p.clone() for p in orig]
    T.ascent_step_(ps, w, ds, [0.001] * len(ps), gam, 1e-20)
    T.restore_(ps, bs)
    assert all(torch.equal(p, o) for p, o in zip(ps, orig))


def test_capture_reuses_and_pins_warm_tables(monkeypatch):
    """Warm-up eagerly, then "capture": the parameters' cached tables are reused (and kept
    alive even through clear_cache), only the new directions' table is built in the capture."""
    T.clear_cache()
    T._captured.clear()
    ps = _rand(ODD, torch.float32)
    bs = [torch.empty_like(p) for p in ps]
    warm_ds = _rand(ODD, torch.float32)  # kept alive: on CUDA the caching allocator would give the fresh
    T.perturb_(ps, warm_ds, 0.01, 1e-20, bs, None)  # directions their addresses (and a cache hit)
    T.restore_(ps, bs)
    warm = _cache_sizes()
    monkeypatch.setattr(T, "SIMULATE_CAPTURE", True)
    built = []
    orig_dev = T._device_table
    monkeypatch.setattr(T, "_device_table", lambda v, ctx: (built.append(len(v)), orig_dev(v, ctx))[1])
    fresh = _rand(ODD, torch.float32, 1e-3)
    orig = [p.clone() for p in ps]
    T.perturb_(ps, fresh, 0.01, 1e-20, bs, None)
    assert built == [len(ps)], f"only the new directions' pointer table may be built, got {built}"
    assert _cache_sizes() == warm
    pinned = set(T._captured)
    assert len(pinned) >= 3  # layout, params, backups
    T.clear_cache()
    assert set(T._captured) == pinned
    rp = _up(orig)
    R.perturb_(rp, _up(fresh), [0.01] * len(ps), 1e-20, None, None)
    assert rel_err(_cat(ps) - _cat(orig), _cat(rp) - _cat(orig)) < 1e-4
    T._captured.clear()


def test_scratch_is_per_stream_and_per_call_in_capture(monkeypatch):
    ps = _rand([(40,), (7,)], torch.float32)
    ctx = T._Ctx(DEV)
    a, b = T._Launch(ps, ctx).part, T._Launch(ps, ctx).part
    assert a is b, "eager calls on one stream share the layout's scratch"
    other = T._Ctx(DEV)
    other.stream = ctx.stream + 1  # another stream
    assert T._Launch(ps, other).part is not a
    monkeypatch.setattr(T, "SIMULATE_CAPTURE", True)
    c1 = T._Launch(ps, T._Ctx(DEV)).part
    c2 = T._Launch(ps, T._Ctx(DEV)).part
    assert c1 is not a and c1 is not c2 and c1.dtype == torch.float64


# --------------------------------------------------------------------------- PGD
PGD_SHAPES = [(5, 3, 7, 7), (1, 1, 1, 1), (3, 33), (2, 65)]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("shape", PGD_SHAPES)
def test_pgd_step(dtype, norm, shape):
    x = torch.rand(shape, dtype=torch.float64, device=DEV).to(dtype)
    eps = 8 / 255 if norm == "Linf" else 0.05
    xa = (x.double() + (torch.rand(shape, dtype=torch.float64, device=DEV) * 2 - 1) * eps).clamp(0, 1).to(dtype)
    g = torch.randn(shape, dtype=torch.float64, device=DEV).to(dtype)
    out = xa.clone()
    T.pgd_step_(out, g, x, 2 / 255 if norm == "Linf" else 0.03, eps, norm)
    ref = xa.double().cpu()
    R.pgd_step_(ref, g.double().cpu(), x.double().cpu(), 2 / 255 if norm == "Linf" else 0.03, eps, norm)
    assert rel_err(out, ref) < tol(dtype)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    if dtype == torch.float32:
        d = (out.double() - x.double()).cpu()
        if norm == "Linf":
            assert d.abs().max() <= eps * (1 + 1e-6)
        else:
            assert (d.reshape(shape[0], -1).norm(dim=1) <= eps * (1 + 1e-5)).all()


@pytest.mark.parametrize("shape", [(5, 3, 7, 7), (2, 5000)])
def test_pgd_l2_default_block(shape):
    """Shipped L2 setting: one block per sample row up to 4096 elements, looping beyond."""
    T.set_config(**PROD)
    x = torch.rand(shape, device=DEV)
    xa = (x + 0.01 * torch.randn_like(x)).clamp(0, 1)
    g = torch.randn_like(x)
    out = xa.clone()
    T.pgd_step_(out, g, x, 0.05, 0.1, "L2")
    ref = xa.double().cpu()
    R.pgd_step_(ref, g.double().cpu(), x.double().cpu(), 0.05, 0.1, "L2")
    assert rel_err(out, ref) < 1e-6


def test_pgd_empty_and_seam():
    e = torch.empty(0, 3, device=DEV)
    T.pgd_step_(e, e.clone(), e.clone(), 0.1, 0.1, "L2")
    x = torch.rand(4, 3, 5, 5, device=DEV)
    xa = (x + 0.01 * torch.randn_like(x)).clamp(0, 1)
    g = torch.randn_like(x)
    a, b = xa.clone(), xa.clone()
    ops.pgd_step_(a, g, x, 2 / 255, 8 / 255, "Linf", backend="triton")
    ops.pgd_step_(b, g, x, 2 / 255, 8 / 255, "Linf", backend="reference")
    assert rel_err(a, b) < 1e-6


def test_pgd_deterministic():
    x = torch.rand(6, 3, 9, 9, device=DEV)
    xa = (x + 0.02 * torch.randn_like(x)).clamp(0, 1)
    g = torch.randn_like(x)
    a, b = xa.clone(), xa.clone()
    T.pgd_step_(a, g, x, 0.05, 0.3, "L2")
    T.pgd_step_(b, g, x, 0.05, 0.3, "L2")
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- layout errors
def test_non_contiguous_error():
    p = torch.randn(8, 6, device=DEV)[:, ::2]
    d = torch.randn(8, 3, device=DEV)
    with pytest.raises(ValueError, match=r"params\[0\].*not contiguous.*\.contiguous\(\)"):
        T.perturb_([p], [d], [0.01], 1e-20, None, None)
    with pytest.raises(ValueError, match=r"directions\[1\].*\.contiguous\(\)"):
        T.perturb_([d, d.clone()], [d, torch.randn(3, 8, device=DEV).t()], [0.01, 0.01], 1e-20, None, None)
    with pytest.raises(ValueError, match=r"params\[0\].*\.contiguous\(\)"):
        ops.perturb_([p], [torch.randn(8, 3, device=DEV)], 0.01, backend="triton")
    x = torch.rand(4, 6, device=DEV)
    with pytest.raises(ValueError, match=r"grad\[0\].*\.contiguous\(\)"):
        T.pgd_step_(x.clone(), torch.randn(6, 4, device=DEV).t(), x, 0.1, 0.1, "Linf")


def test_channels_last_accepted_when_layouts_match():
    w = torch.randn(4, 3, 3, 5, device=DEV).to(memory_format=torch.channels_last)
    d = torch.randn(4, 3, 3, 5, device=DEV).to(memory_format=torch.channels_last)
    b = torch.full_like(w, float("nan"))
    assert b.stride() == w.stride()
    p = w.clone()
    T.perturb_([p], [d], [0.02], 1e-20, [b], None)
    rp = _up([w])
    R.perturb_(rp, _up([d]), [0.02], 1e-20, None, None)
    assert rel_err(p, rp[0]) < 1e-6 and torch.equal(b, w)
    with pytest.raises(ValueError, match=r"directions\[0\].*not laid out like params\[0\]"):
        T.perturb_([p], [d.contiguous()], [0.02], 1e-20, None, None)


# --------------------------------------------------------------------------- the seam
def test_through_the_seam_mixed_groups(monkeypatch):
    shapes = [(5, 3), (33,), (2, 2, 3)]
    ps = _rand(shapes, torch.float32) + _rand(shapes, torch.bfloat16) + _rand(shapes, torch.float64)
    ds = _rand(shapes * 3, torch.float32, 1e-3)  # directions cast to each param's dtype by the seam
    orig = [p.clone() for p in ps]
    bs = _nan(ps)
    monkeypatch.setenv("AWPFAST_BACKEND", "triton")
    dn = ops.perturb_(ps, ds, 0.01, backups=bs)
    rp = _up(orig)
    rdn = R.perturb_(rp, [d.double().to(p.dtype).double().cpu() for d, p in zip(ds, orig)],
                     [0.01] * len(ps), 1e-20, None, None)
    assert rel_err(dn, rdn) < 1e-6
    for i, dt in enumerate([torch.float32] * 3 + [torch.bfloat16] * 3 + [torch.float64] * 3):
        assert rel_err(ps[i], rp[i]) < tol(dt)
    ops.restore_(ps, bs)
    assert [torch.equal(p, o) for p, o in zip(ps, orig)] == [True] * len(ps), [(p.dtype, (p - o).abs().max()) for p, o in zip(ps, orig)]


def test_custom_ops_registered_and_opcheck():
    for name in ("triton_norms", "triton_perturb_", "triton_restore_", "triton_unperturb_",
                 "triton_ascent_step_", "triton_project_", "triton_pgd_step_"):
        assert hasattr(torch.ops.awpfast, name), name
    ps, ds = _rand([(5, 3), (33,)], torch.float32), _rand([(5, 3), (33,)], torch.float32)
    bs, vs = [torch.empty_like(p) for p in ps], [torch.empty_like(p) for p in ps]
    torch.library.opcheck(torch.ops.awpfast.triton_perturb_.default, (ps, ds, [0.01, 0.02], 1e-20, bs, vs),
                          test_utils=("test_schema", "test_faketensor"))
    x = torch.rand(2, 3, 4, 4, device=DEV)
    torch.library.opcheck(torch.ops.awpfast.triton_pgd_step_.default,
                          ((x + 0.01).clamp(0, 1), torch.randn_like(x), x, 0.01, 0.03, "L2"),
                          test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------- compiled code
def test_kernels_compile_for_sm90_with_vector_accesses():
    """Compile the kernels ahead of time for an H100 (no GPU needed; a fresh process, since
    this one interprets them) and check that the full-block paths use 128-bit accesses,
    i.e. the alignment hints took effect, and that no kernel uses an approximate or
    subnormal-flushing square root or division (``sqrt.approx``, ``div.full``, ``.ftz``
    on a sqrt/div), which would turn a tiny direction norm into 0."""
    import subprocess
    import sys
    code = r'''
import os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from awpfast.ops import _triton_kernels as K
tgt = GPUTarget("cuda", 90, 32)
div = lambda n: {(i,): [["tt.divisibility", 16]] for i in range(n)}
BAD = re.compile(r"(sqrt|div|rcp)\.(approx|full)|(sqrt|div|rcp)[a-z.]*\.ftz")
def ptx(fn, sig, const, attrs):
    s = triton.compile(ASTSource(fn, sig, const, attrs), target=tgt, options={"num_warps": 4}).asm["ptx"]
    bad = sorted(set(m.group(0) for m in BAD.finditer(s)))
    assert not bad, (fn.__name__, const, bad)
    return s
P = "*i64"
for dt in ("fp32", "bf16"):
    for mode in (K.R_NORM.value, K.R_PERTURB.value, K.R_ASCENT.value, K.R_PROJECT.value):
        sig = dict(P0=P, P1=P, P2=P, PROTO="*" + dt, TINFO=P, CTAB=P, PART="*fp64", C="i32",
                   MODE="constexpr", BLOCK="constexpr", ALIGNED="constexpr")
        s = ptx(K.mt_reduce_kernel, sig, dict(MODE=mode, BLOCK=1024, ALIGNED=True), div(7))
        assert "ld.global.v4" in s, ("reduce", dt, mode)
    for mode in (K.A_PERTURB.value, K.A_RESTORE.value, K.A_UNPERTURB.value, K.A_ASCENT.value, K.A_PROJECT.value):
        sig = dict(P0=P, P1=P, P2=P, P3=P, PROTO="*" + dt, TINFO=P, CTAB=P, PART="*fp64", C="i32",
                   S0="*fp64", S1="*fp64", s0="fp32", s1="fp32", eps="fp32", OUT="*fp32",
                   MODE="constexpr", PER_TENSOR="constexpr", HAS_B="constexpr", HAS_D="constexpr",
                   BLOCK="constexpr", KB="constexpr", ALIGNED="constexpr")
        s = ptx(K.mt_apply_kernel, sig, dict(MODE=mode, PER_TENSOR=mode in (K.A_RESTORE.value, K.A_ASCENT.value), HAS_B=True, HAS_D=True,
                                             BLOCK=1024, KB=1024, ALIGNED=True), div(8))
        assert "ld.global.v4" in s and "st.global.v4" in s, ("apply", dt, mode)
        if mode in (K.A_PERTURB.value, K.A_ASCENT.value, K.A_PROJECT.value):
            assert "sqrt.rn.f64" in s, ("apply", dt, mode)
    for weighted in (False, True):  # the family ops
        sig = dict(P0=P, P1=P, PROTO="*" + dt, TINFO=P, CTAB=P, PART="*fp64", eta="fp32",
                   WEIGHTED="constexpr", BLOCK="constexpr", ALIGNED="constexpr")
        s = ptx(K.mt_sqnorm_kernel, sig, dict(WEIGHTED=weighted, BLOCK=1024, ALIGNED=True), div(6))
        assert "ld.global.v4" in s, ("sqnorm", dt, weighted)
    ADD, ASAM, BOX = K.F_ADD.value, K.F_ASAM.value, K.F_BOX.value
    for mode, given in ((ADD, False), (ASAM, False), (BOX, False), (BOX, True)):
        sig = dict(P0=P, P1=P, P2=P, P3=P, P4=P, PROTO="*" + dt, TINFO=P, CTAB=P, PART="*fp64", C="i32",
                   S0="*fp64", S1="*fp64", s0="fp32", s1="fp32", clip="fp32", eta="fp32", eps="fp32",
                   ND="*fp64", NW="*fp64", OUT="*fp32", MODE="constexpr", T0="constexpr", T1="constexpr",
                   HAS_B="constexpr", HAS_D="constexpr", HAS_BASE="constexpr", CLIP="constexpr",
                   FIRST="constexpr", GIVEN="constexpr", BLOCK="constexpr", KB="constexpr", ALIGNED="constexpr")
        const = dict(MODE=mode, T0=True, T1=mode == BOX, HAS_B=mode != BOX, HAS_D=mode == ADD,
                     HAS_BASE=mode == ADD, CLIP=mode == ADD, FIRST=True, GIVEN=given, BLOCK=1024,
                     KB=1024, ALIGNED=True)
        s = ptx(K.mt_family_apply_kernel, sig, const, div(9))
        assert "ld.global.v4" in s and "st.global.v4" in s, ("family apply", dt, mode, given)
        if mode == BOX and not given:
            assert "sqrt.rn.f64" in s and "div.rn.f64" in s, ("family apply", dt, mode)
    sig = dict(XA="*" + dt, G="*" + dt, X="*" + dt, N="i32", alpha="fp32", eps="fp32", BLOCK="constexpr")
    assert "st.global.v4" in ptx(K.pgd_linf_kernel, sig, dict(BLOCK=1024), div(4))
    sig = dict(XA="*" + dt, G="*" + dt, X="*" + dt, R="i32", alpha="fp32", eps="fp32", BLOCK="constexpr")
    s = ptx(K.pgd_l2_kernel, sig, dict(BLOCK=1024), div(4))
    assert "st.global.v4" in s and "div.rn.f32" in s and "sqrt.rn.f64" in s
sig = dict(PART="*fp64", TINFO=P, OUT="*fp32", C="i32", KB="constexpr")
assert "sqrt.rn.f64" in ptx(K.mt_norms_finalize_kernel, sig, dict(KB=1024), {})
ptx(K.sum_partials_kernel, dict(PART="*fp64", C="i32", OUT="*fp32", KB="constexpr"), dict(KB=1024), {})
sig = dict(OUT=P, start="i64", n="i64", **{f"{c}{k}": "i64" for k in range(8) for c in "hl"})
ptx(K.fill_i64_kernel, sig, {}, {})
print("OK")
'''
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if r.returncode != 0 and ("ASTSource" in r.stderr and "TypeError" in r.stderr or "GPUTarget" in r.stderr
                              and "ImportError" in r.stderr):
        pytest.skip(f"this Triton's ahead-of-time compile API differs: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


# --------------------------------------------------------------------------- CUDA only
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_cuda_graph_capture():
    T.set_config(**PROD)
    shapes = [(64, 3, 3, 3), (300000,), (10, 640)]
    ps, ds = _rand(shapes, torch.float32), _rand(shapes, torch.float32)
    orig = [p.clone() for p in ps]
    bs = [torch.empty_like(p) for p in ps]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: compiles kernels, builds and caches the tables
        T.perturb_(ps, ds, 0.01, 1e-20, bs, None)
        T.restore_(ps, bs)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        dn = T.perturb_(ps, ds, 0.01, 1e-20, bs, None)
    for _ in range(2):
        g.replay()
        torch.cuda.synchronize()
        rp = _up(orig)
        rdn = R.perturb_(rp, _up(ds), [0.01] * 3, 1e-20, None, None)
        assert rel_err(dn, rdn) < 1e-6
        assert rel_err(_cat(ps) - _cat(orig), _cat(rp) - _cat(orig)) < 1e-4
        T.restore_(ps, bs)
        assert all(torch.equal(p, o) for p, o in zip(ps, orig))


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_properties(0).total_memory < 40e9 if CUDA else True,
                    reason="int64 indexing needs a CUDA device with >= 40 GB for a 2**31+ element tensor")
def test_int64_indexing_huge_tensor():
    T.set_config(**PROD)
    n = 2 ** 31 + 3
    p = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    d = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    b = torch.empty_like(p)
    tail_p, tail_d = p[-4096:].double().clone(), d[-4096:].double()
    wn = torch.linalg.vector_norm(p, dtype=torch.float32).double()
    dn_ref = torch.linalg.vector_norm(d, dtype=torch.float32).double()
    dn = T.perturb_([p], [d], [0.01], 1e-20, [b], None)
    assert abs(dn[0].item() - dn_ref.item()) / dn_ref.item() < 1e-4
    expect = tail_p + 0.01 * wn / dn_ref * tail_d
    assert rel_err(p[-4096:], expect) < 1e-2
    assert torch.equal(b[-4096:].double(), tail_p)
    T.restore_([p], [b])
    assert torch.equal(p[-4096:].double(), tail_p)


def test_empty_lists():
    assert T.norms([]).numel() == 0
    assert T.perturb_([], [], [], 1e-20, None, None).numel() == 0
    assert T.ascent_step_([], [], [], [], [], 1e-20).numel() == 0
    T.restore_([], [])
    T.unperturb_([], [])
    T.project_([], [], [])


def test_awp_steps_with_tables_built_as_in_a_capture(monkeypatch):
    """Whole AWP steps (ascent gradients from autograd.grad at fresh addresses every step)
    with the capture path on: tables built by the fill kernel, nothing cached; the weights
    equal a normal run bit for bit."""
    import copy

    import torch.nn as nn
    import torch.nn.functional as F

    import awpfast
    T.set_config(**PROD)  # few programs: the interpreter is slow
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10)).to(DEV)
    x, y = torch.rand(4, 3, 6, 6, device=DEV), torch.randint(0, 10, (4,), device=DEV)

    def run(simulate):
        m = copy.deepcopy(base)
        awp = awpfast.AWP(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m, gamma=0.02, steps=2,
                          backend="triton")
        for i in range(3):
            monkeypatch.setattr(T, "SIMULATE_CAPTURE", simulate and i > 0)  # eager warm-up first
            awp.perturb(lambda: F.cross_entropy(m(x), y))
            awp.zero_grad()
            F.cross_entropy(m(x), y).backward()
            awp.step()
        monkeypatch.setattr(T, "SIMULATE_CAPTURE", False)
        return [p.detach().clone() for p in m.parameters()]

    T.clear_cache()
    want = run(False)
    T.clear_cache()
    got = run(True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
