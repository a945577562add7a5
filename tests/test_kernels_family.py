"""The fused kernels of the weight-perturbation family ops (``add_scaled_``, ``global_sqnorm``,
``asam_apply_``, ``box_perturb_``) in the kernel backends: ``native`` (awpfast._C on the CPU,
awpfast._C_cuda on CUDA) and ``triton`` (the CPU interpreter here, compiled kernels on CUDA).

Method (design brief section 4): independent float64 formulas, fresh random inputs, NaN-poisoned
outputs (every element must be written), odd sizes around each backend's chunk (BLOCK +- 1,
empty, 1-element, more than one chunk), 1,000+ tensors in one call, every dtype, bitwise
determinism (repeat; 1/2/3 threads, both ISA variants and any segment size for the native CPU
kernels), errors, the torch.library registration (opcheck, torch.compile) and, on a CUDA
machine, CUDA-graph capture and no host sync. Every test first makes the foreach
implementations raise, so a kernel backend that silently fell back to them would fail.
"""
import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import awpfast.ops as ops  # noqa: E402
from awpfast.ops import foreach as F  # noqa: E402
from awpfast.ops import native  # noqa: E402
from conftest import rel_err, tol  # noqa: E402

try:
    import triton  # noqa: F401
    from awpfast.ops import triton as T
    if not CUDA and os.environ.get("TRITON_INTERPRET") == "1":
        T._use_interpreter()
        getattr(ops, "_loaded", {}).pop("triton", None)  # let the seam re-check availability
    _TRITON_OK, _TRITON_WHY = T.available()
except ImportError as e:  # pragma: no cover - depends on the environment
    T, _TRITON_OK, _TRITON_WHY = None, False, f"triton is not installed ({e})"

FAMILY = ("add_scaled_", "global_sqnorm", "asam_apply_", "box_perturb_")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TRITON_SMALL = dict(BLOCK=32, CHUNK=64, MAXK=4, KB=4)


def _native_cuda_why():
    if not CUDA:
        return "no CUDA device"
    ok, why = native.cuda_status()
    if not ok:
        return f"CUDA native kernels cannot run here: {why}"
    return ""


_NCUDA_WHY = _native_cuda_why()
_NCPU_WHY = "" if native.available()[0] else f"the native CPU kernels are not available: {native.available()[1]}"
TDEV = "cuda" if CUDA else "cpu"
KERNELS = [
    pytest.param(("native", "cpu"), id="native-cpu", marks=pytest.mark.skipif(bool(_NCPU_WHY), reason=_NCPU_WHY)),
    pytest.param(("native", "cuda"), id="native-cuda", marks=pytest.mark.skipif(bool(_NCUDA_WHY), reason=_NCUDA_WHY)),
    pytest.param(("triton", TDEV), id=f"triton-{TDEV}",
                 marks=pytest.mark.skipif(not _TRITON_OK, reason=f"triton backend unavailable: {_TRITON_WHY}")),
]


def _dtypes(backend):
    return DTYPES if backend == "native" else [torch.float32, torch.float16, torch.bfloat16]  # (triton: no fp64)


def _sizes(kb):
    """Odd sizes around the backend's chunk: BLOCK/CHUNK +- 1, empty and 1-element tensors, a
    tensor of several chunks."""
    backend, device = kb
    if backend == "triton":
        return [15, 1, 0, 31, 32, 33, 189, 65, 300, 2]
    c = native._C_cuda.CHUNK if device == "cuda" else native._C.CHUNK
    return [1, c - 1, 0, 17, c + 1, 5]


@pytest.fixture
def kernel(request, monkeypatch):
    """(backend, device) of a kernel test: the foreach family ops raise (no silent fallback);
    the Triton interpreter runs with small blocks and chunks."""
    kb = request.param
    for name in FAMILY:
        def boom(*a, _n=name, **k):
            raise AssertionError(f"{kb[0]} fell back to foreach.{_n}")
        monkeypatch.setattr(F, name, boom)
    if kb[0] == "triton" and not CUDA:
        old = T.set_config(**TRITON_SMALL)
        yield kb
        T.set_config(**old)
    else:
        yield kb


def kernels(fn):
    return pytest.mark.parametrize("kernel", KERNELS, indirect=True)(fn)


def _rand(sizes, dtype, device, scale=1.0, gen=None):
    return [(torch.randn(n, dtype=torch.float64, generator=gen) * scale).to(dtype).to(device) for n in sizes]


def _poison(ts):
    return [torch.full_like(t, float("nan")) for t in ts]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cat(ts):
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in ts]) if ts else torch.zeros(0, dtype=torch.float64)


def _close(out, ref, dtype, what):
    e = rel_err(_cat(out), _cat(ref))
    assert e <= tol(dtype), f"{what}: rel err {e:.3g} > {tol(dtype):.1g}"


def _bits_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and (
        a.numel() == 0 or torch.equal(a.cpu().reshape(-1).view(torch.uint8), b.cpu().reshape(-1).view(torch.uint8)))


# ----------------------------------------------------------------------------- float64 formulas
def _add64(ps, ds, scales, clip=None, base=None):
    out, vs = [], []
    for i, (p, d) in enumerate(zip(ps, ds)):
        d64 = d.double().cpu()
        if clip is not None:
            d64 = d64.clamp(-clip, clip)
        v = float(scales[i]) * d64
        vs.append(v)
        out.append((base[i] if base is not None else p).double().cpu() + v)
    return out, vs


def _sqnorm64(ts, ws=None, eta=0.0):
    total = 0.0
    for i, t in enumerate(ts):
        x = t.double().cpu()
        if ws is not None:
            x = (ws[i].double().cpu().abs() + eta) * x
        total += float((x * x).sum())
    return total


def _asam64(ps, ds, scales, eta):
    return [p.double().cpu() + float(s) * (p.double().cpu().abs() + eta) ** 2 * d.double().cpu()
            for p, d, s in zip(ps, ds, scales)]


def _box64(ps, ds, lrs, aes, origins, eps=1e-6, norms=None):
    """The notebook's step per tensor: w + lr*(||w|| + eps)/(||g|| + eps)*g clamped to o +- ae|o|;
    tensors with ||g|| == 0 or non-finite unchanged. Returns (params, direction norms)."""
    out, dns = [], []
    for i, (p, d, o) in enumerate(zip(ps, ds, origins)):
        p64, d64, o64 = p.double().cpu(), d.double().cpu(), o.double().cpu()
        gn = float(d64.norm()) if norms is None else float(norms[0][i])
        wn = float(p64.norm()) if norms is None else float(norms[1][i])
        dns.append(gn)
        if gn == 0.0 or not math.isfinite(gn):
            out.append(p64)
            continue
        new = p64 + lrs[i] * (wn + eps) / (gn + eps) * d64
        r = aes[i] * o64.abs()
        out.append(torch.minimum(torch.maximum(new, o64 - r), o64 + r))
    return out, dns


# ----------------------------------------------------------------------------- the backends have their own kernels
@kernels
def test_backend_has_its_own_family_kernels(kernel):
    backend, device = kernel
    be = ops.get_backend(backend, torch.device(device), torch.float32)
    assert be.__name__.endswith(backend)
    for n in FAMILY:
        assert hasattr(torch.ops.awpfast, backend + "_" + n), n
        assert be._OPS.impls[n].__module__ == be.__name__, n  # the backend's own kernels


# ----------------------------------------------------------------------------- add_scaled_
@kernels
@pytest.mark.parametrize("clip", [None, 0.7])
@pytest.mark.parametrize("variant", ["tensor+backup+delta", "list+base+delta", "float", "0dim+base+backup"])
def test_add_scaled(kernel, clip, variant):
    backend, device = kernel
    sizes = _sizes(kernel)
    for dtype in _dtypes(backend):
        ps, ds = _rand(sizes, dtype, device), _rand(sizes, dtype, device)
        base = _rand(sizes, dtype, device) if "base" in variant else None
        n = len(ps)
        if variant.startswith("tensor"):
            scale = (torch.rand(n, dtype=torch.float64) * 0.2 - 0.1).to(_acc(dtype)).to(device)
            s_list = scale.tolist()
        elif variant.startswith("list"):
            scale = s_list = [0.01 * (i - 4) for i in range(n)]
        elif variant == "float":
            scale, s_list = -0.03, [-0.03] * n
        else:
            scale = torch.tensor(0.05, dtype=_acc(dtype), device=device)
            s_list = [0.05] * n
        orig = [p.clone() for p in ps]
        ref, ref_v = _add64(orig, ds, s_list, clip, base)
        work = _poison(ps) if base is not None else ps  # from the base: every element must be written
        bs = _poison(ps) if "backup" in variant else None
        vs = _poison(ps) if "delta" in variant else None
        d_before, w_before = [d.clone() for d in ds], [w.clone() for w in work]
        ops.add_scaled_(work, ds, scale, clip=clip, base=base, backups=bs, deltas=vs, backend=backend)
        _close(work, ref, dtype, f"{variant} params {dtype}")
        assert all(_bits_equal(a, b) for a, b in zip(ds, d_before)), "directions must not be written"
        if bs is not None:  # (the params before the write: the NaN poison when starting from a base)
            assert all(_bits_equal(b, o) for b, o in zip(bs, w_before)), "backups must be bit-exact copies"
        if vs is not None:
            e = rel_err(_cat(vs), _cat(ref_v))
            assert e <= max(tol(dtype), 1e-6), f"deltas: {e:.3g}"


@kernels
def test_add_scaled_zero_scale_from_base_is_bitwise_base(kernel):
    backend, device = kernel
    sizes = _sizes(kernel)
    for dtype in _dtypes(backend):
        base, ds = _rand(sizes, dtype, device), _rand(sizes, dtype, device)
        work = _poison(base)
        ops.add_scaled_(work, ds, 0.0, base=base, backend=backend)
        assert all(_bits_equal(w, b) for w, b in zip(work, base))


# ----------------------------------------------------------------------------- global_sqnorm
@kernels
@pytest.mark.parametrize("weighted,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_global_sqnorm(kernel, weighted, eta):
    backend, device = kernel
    sizes = _sizes(kernel)
    for dtype in _dtypes(backend):
        ts = _rand(sizes, dtype, device)
        ws = _rand(sizes, dtype, device) if weighted else None
        out = ops.global_sqnorm(ts, weights=ws, eta=eta, backend=backend)
        assert out.dim() == 0 and out.dtype == _acc(dtype) and out.device.type == device
        ref = _sqnorm64(ts, ws, eta)
        e = abs(float(out) - ref) / ref
        assert e <= (1e-12 if dtype == torch.float64 else 1e-6), (dtype, float(out), ref)


@kernels
def test_global_sqnorm_nonfinite_and_empty(kernel):
    backend, device = kernel
    ts = _rand([5, 6, 0], torch.float32, device)
    ts[1][4] = float("nan")
    assert torch.isnan(ops.global_sqnorm(ts, backend=backend))
    ts[1][4] = float("inf")
    assert torch.isinf(ops.global_sqnorm(ts, backend=backend))
    assert torch.isinf(ops.global_sqnorm(ts, weights=_rand([5, 6, 0], torch.float32, device), backend=backend))
    z = ops.global_sqnorm([torch.empty(0, device=device), torch.empty(0, 3, device=device)], backend=backend)
    assert z.dim() == 0 and float(z) == 0.0


# ----------------------------------------------------------------------------- asam_apply_
@kernels
@pytest.mark.parametrize("eta", [0.0, 0.01])
@pytest.mark.parametrize("scale_form", ["tensor", "list", "float"])
def test_asam_apply(kernel, eta, scale_form):
    backend, device = kernel
    sizes = _sizes(kernel)
    for dtype in _dtypes(backend):
        ps, ds = _rand(sizes, dtype, device), _rand(sizes, dtype, device)
        n = len(ps)
        if scale_form == "tensor":
            scale = (torch.rand(n, dtype=torch.float64) * 0.2 + 0.05).to(_acc(dtype)).to(device)
            s_list = scale.tolist()
        elif scale_form == "list":
            scale = s_list = [0.02 * (i + 1) for i in range(n)]
        else:
            scale, s_list = 0.1, [0.1] * n
        orig = [p.clone() for p in ps]
        ref = _asam64(orig, ds, s_list, eta)
        bs = _poison(ps) if scale_form != "float" else None
        ops.asam_apply_(ps, ds, scale, eta=eta, backups=bs, backend=backend)
        _close(ps, ref, dtype, f"asam {dtype}")
        if bs is not None:
            assert all(_bits_equal(b, o) for b, o in zip(bs, orig)), "backups must be bit-exact copies"
    # eta = 0 and w = 0: T = 0, the weight does not move (davda54's adaptive SAM)
    zero = [torch.zeros(7, device=device)]
    ops.asam_apply_(zero, [torch.randn(7, device=device)], 1.0, backend=backend)
    assert torch.equal(zero[0].cpu(), torch.zeros(7))


# ----------------------------------------------------------------------------- box_perturb_
def _box_case(kb, dtype, gen=None):
    sizes = _sizes(kb)
    ps = _rand(sizes, dtype, kb[1], gen=gen)
    ds = _rand(sizes, dtype, kb[1], 1e-3, gen=gen)
    small = [i for i, n in enumerate(sizes) if 0 < n < 100]
    ds[small[0]].zero_()                      # zero direction: skipped
    ds[small[1]].view(-1)[0] = float("nan")   # non-finite: skipped
    ds[small[2]].view(-1)[-1] = float("inf")
    return ps, ds, small[:3]


@kernels
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("given", [False, True])
def test_box_perturb(kernel, first, given):
    backend, device = kernel
    for dtype in _dtypes(backend):
        ps, ds, skipped = _box_case(kernel, dtype)
        n = len(ps)
        lrs = [1.0 if i % 2 else 0.05 * (i + 1) for i in range(n)]   # lr 1: the box clamps
        aes = [0.2 + 0.01 * i for i in range(n)]
        orig = [p.clone() for p in ps]
        if first:
            origins = _poison(ps)
            centre = orig
        else:  # a later step: the box is around the origins, the norms are those of the current weights
            origins = [(p.double() + 0.05 * torch.randn_like(p, dtype=torch.float64)).to(dtype) for p in ps]
            centre = [o.clone() for o in origins]
        norms = None
        if given:
            norms = ((torch.rand(n, dtype=torch.float64, device=device) + 0.5) * 1e-3,  # (directions ~1e-3)
                     torch.rand(n, dtype=torch.float64, device=device) + 0.5)
            norms[0][skipped[0]] = 0.0
            norms[0][skipped[1]] = float("nan")
            norms[0][skipped[2]] = float("inf")
            # non-finite directions with finite given norms would be moved: keep those finite here
            ds[skipped[1]].nan_to_num_(0.5)
            ds[skipped[2]].nan_to_num_(posinf=0.5)
        ref, ref_dn = _box64(orig, ds, lrs, aes, centre, norms=norms)
        dn = ops.box_perturb_(ps, ds, lrs, aes, origins, first=first, norms=norms, backend=backend)
        assert dn.dtype == _acc(dtype) and dn.shape == (n,) and dn.device.type == device
        rd = torch.tensor(ref_dn, dtype=torch.float64)
        fin = torch.isfinite(rd)
        assert torch.equal(torch.isnan(dn.cpu()), torch.isnan(rd)) and torch.equal(torch.isinf(dn.cpu()), torch.isinf(rd))
        assert rel_err(dn.cpu()[fin], rd[fin]) <= max(tol(dtype), 1e-6)
        _close(ps, ref, dtype, f"box params {dtype}")
        for i in skipped:
            assert _bits_equal(ps[i], orig[i]), f"tensor {i} (zero/non-finite direction norm) must be left unchanged"
        assert all(_bits_equal(o, c) for o, c in zip(origins, centre)), \
            "origins: a bit-exact copy when first, untouched otherwise"
        moved = sum(int((p.double() != o.double()).sum()) for p, o in zip(ps, orig))
        hit = sum(int(((p.double() - c.double()).abs() >= 0.999 * a * c.double().abs()).sum() - (c == 0).sum())
                  for p, c, a in zip(ps, centre, aes))
        assert moved > 0 and hit > 0, "the test must move the weights and hit the box"


@kernels
def test_box_perturb_tiny_direction_norm_not_flushed(kernel):
    """||d|| ~ 1e-25: float32 squares would underflow to 0 and skip the tensor."""
    backend, device = kernel
    d = (torch.randn(100, dtype=torch.float64) * 1e-26).to(torch.float32)
    p = torch.randn(100).to(device)
    dn = ops.box_perturb_([p], [d.to(device)], 1.0, 0.2, [torch.empty_like(p)], first=True, backend=backend)
    ref = float(d.double().norm())
    assert ref > 0 and abs(float(dn[0]) - ref) / ref < 1e-6


# ----------------------------------------------------------------------------- 1,000+ tensors
@kernels
def test_thousand_tensors(kernel):
    backend, device = kernel
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(2), "little"))
    sizes = torch.randint(0, 40, (1003,), generator=gen).tolist() + [_sizes(kernel)[-2]]
    ts, ws = _rand(sizes, torch.float32, device, gen=gen), _rand(sizes, torch.float32, device, gen=gen)
    out = ops.global_sqnorm(ts, weights=ws, eta=0.05, backend=backend)
    ref = _sqnorm64(ts, ws, 0.05)
    assert abs(float(out) - ref) / ref <= 1e-6
    if backend == "triton" and not CUDA:
        return  # the interpreter takes ~10 s per 1,000-program launch: one op is enough here
    n = len(sizes)
    scale = torch.rand(n, dtype=torch.float32, device=device)
    orig = [t.clone() for t in ts]
    bs = _poison(ts)
    ops.add_scaled_(ts, ws, scale, clip=0.5, backups=bs, backend=backend)
    _close(ts, _add64(orig, ws, scale.tolist(), 0.5)[0], torch.float32, "add_scaled")
    assert all(_bits_equal(b, o) for b, o in zip(bs, orig))
    ops.restore_(ts, bs, backend=backend)
    ops.asam_apply_(ts, ws, scale, eta=0.01, backend=backend)
    _close(ts, _asam64(orig, ws, scale.tolist(), 0.01), torch.float32, "asam")
    lrs = [0.1 * (1 + i % 3) for i in range(n)]
    os_ = _poison(ts)
    cur = [t.clone() for t in ts]
    dn = ops.box_perturb_(ts, ws, lrs, 0.1, os_, first=True, backend=backend)
    ref_p, ref_dn = _box64(cur, ws, lrs, [0.1] * n, cur)
    _close(ts, ref_p, torch.float32, "box")
    assert rel_err(dn, torch.tensor(ref_dn)) <= 1e-6


# ----------------------------------------------------------------------------- determinism
def _run_all(kb, dtype, seed):
    """Every family op once on fixed inputs; every output."""
    backend, device = kb
    g = torch.Generator().manual_seed(seed)
    sizes = _sizes(kb)
    if backend == "native" and device == "cpu":
        sizes = sizes + [5 * native._C.CHUNK + 11]  # enough elements for 3 threads
    ps, ds, ws = (_rand(sizes, dtype, device, gen=g) for _ in range(3))
    outs = [ops.global_sqnorm(ds, backend=backend), ops.global_sqnorm(ds, weights=ps, eta=0.01, backend=backend)]
    bs, vs = _poison(ps), _poison(ps)
    scale = torch.rand(len(ps), generator=g, dtype=torch.float64).to(_acc(dtype)).to(device) * 0.1
    ops.add_scaled_(ps, ds, scale, clip=0.5, backups=bs, deltas=vs, backend=backend)
    outs += ps + bs + vs
    ops.asam_apply_(ps, ds, scale, eta=0.01, backend=backend)
    outs += list(ps)
    os_ = _poison(ps)
    outs.append(ops.box_perturb_(ps, ds, 1.0, 0.2, os_, first=True, backend=backend))
    outs.append(ops.box_perturb_(ps, ws, 0.5, 0.2, os_, first=False, backend=backend))
    outs += ps + os_
    return [o.detach().cpu().clone() for o in outs]


def _all_bits_equal(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert _bits_equal(x, y), f"output {i} differs"


@kernels
def test_bitwise_repeat(kernel):
    seed = int.from_bytes(os.urandom(4), "little")
    interp = kernel[0] == "triton" and not CUDA
    for dtype in [torch.bfloat16] if interp else _dtypes(kernel[0]):  # (the interpreter is slow)
        _all_bits_equal(_run_all(kernel, dtype, seed), _run_all(kernel, dtype, seed))


@pytest.mark.skipif(bool(_NCPU_WHY), reason=_NCPU_WHY or "-")
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_cpu_bitwise_across_threads_isa_segments(dtype, monkeypatch):
    C = native._C
    kb = ("native", "cpu")
    seed = int.from_bytes(os.urandom(4), "little")
    old_threads, initial_isa = torch.get_num_threads(), C.isa()
    try:
        torch.set_num_threads(1)
        base = _run_all(kb, dtype, seed)
        for nt in (2, 3):
            torch.set_num_threads(nt)
            _all_bits_equal(base, _run_all(kb, dtype, seed))
        if dtype not in (torch.float32, torch.bfloat16):
            return  # (the other dtypes run the same segment and ISA code paths)
        torch.set_num_threads(2)
        for seg in (0, 1, 1 << 40):  # no segments, one tensor each, one segment
            monkeypatch.setattr(native, "SEGMENT_BYTES", seg)
            _all_bits_equal(base, _run_all(kb, dtype, seed))
        monkeypatch.setattr(native, "SEGMENT_BYTES", None)
        for isa in ("baseline", "avx2"):
            if C.set_isa(isa):
                _all_bits_equal(base, _run_all(kb, dtype, seed))
        C.set_stream_backups(False)
        _all_bits_equal(base, _run_all(kb, dtype, seed))
    finally:
        torch.set_num_threads(old_threads)
        C.set_isa(initial_isa)
        C.set_stream_backups(True)


# ----------------------------------------------------------------------------- layouts and errors
@pytest.mark.skipif(bool(_NCPU_WHY), reason=_NCPU_WHY or "-")
def test_native_strided_layouts():
    """channels_last tensors are used in place; a transposed weight goes through a copy that
    is written back (params and backups/origins)."""
    w = torch.randn(8, 5, 3, 3).to(memory_format=torch.channels_last)
    d = torch.randn(8, 5, 3, 3).to(memory_format=torch.channels_last)
    t = torch.randn(9, 13).t()
    dt_ = torch.randn(13, 9)
    ptr = w.data_ptr()
    orig = [w.clone(), t.clone()]
    bs = [torch.empty_like(w), torch.full((13, 9), float("nan"))]
    ops.add_scaled_([w, t], [d, dt_], [0.1, -0.2], clip=0.3, backups=bs, backend="native")
    ref, _ = _add64(orig, [d, dt_], [0.1, -0.2], 0.3)
    assert w.data_ptr() == ptr and w.is_contiguous(memory_format=torch.channels_last)
    _close([w, t], ref, torch.float32, "strided add_scaled")
    assert _bits_equal(bs[0], orig[0]) and torch.equal(bs[1], orig[1])
    os_ = [torch.empty_like(w), torch.full((13, 9), float("nan"))]
    cur = [w.clone(), t.clone()]
    ops.box_perturb_([w, t], [d, dt_], 1.0, 0.2, os_, first=True, backend="native")
    ref, _ = _box64(cur, [d, dt_], [1.0, 1.0], [0.2, 0.2], cur)
    _close([w, t], ref, torch.float32, "strided box")
    assert torch.equal(os_[0], cur[0]) and torch.equal(os_[1], cur[1])
    sq = ops.global_sqnorm([t], weights=[torch.randn(13, 9)], backend="native")
    assert torch.isfinite(sq)


@pytest.mark.skipif(bool(_NCPU_WHY), reason=_NCPU_WHY or "-")
def test_native_extension_rejects_bad_arguments():
    C = native._C
    x, y = torch.randn(4), torch.randn(4)
    out = torch.empty(2)
    sc = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="directions has 2 entries"):
        C.add_scaled([x.data_ptr()], [y.data_ptr()] * 2, [], [], [], [4], [1.0], 0, False, 0.0, 0, 1)
    with pytest.raises(ValueError, match="scales has 0 entries"):
        C.add_scaled([x.data_ptr()], [y.data_ptr()], [], [], [], [4], [], 0, False, 0.0, 0, 1)
    with pytest.raises(ValueError, match="not both"):
        C.asam_apply([x.data_ptr()], [y.data_ptr()], [], [4], [1.0], sc.data_ptr(), 0.0, 0, 1)
    with pytest.raises(ValueError, match="weights has 2 entries"):
        C.global_sqnorm([x.data_ptr()], [y.data_ptr()] * 2, [4], 0.0, 0, out.data_ptr(), 1)
    with pytest.raises(ValueError, match="both norm arrays or neither"):
        C.box_perturb([x.data_ptr()], [y.data_ptr()], [out.data_ptr()], [4], [1.0], [0.2], True, 1e-6,
                      sc.data_ptr(), 0, 0, out.data_ptr(), 1)
    with pytest.raises(ValueError, match="adv_epss has 0 entries"):
        C.box_perturb([x.data_ptr()], [y.data_ptr()], [out.data_ptr()], [4], [1.0], [], True, 1e-6, 0, 0, 0,
                      out.data_ptr(), 1)
    with pytest.raises(ValueError, match="dtype"):
        C.global_sqnorm([x.data_ptr()], [], [4], 0.0, 7, out.data_ptr(), 1)
    with pytest.raises(ValueError, match="contiguous float64"):
        native._impl_add_scaled_([x], [y], [], torch.ones(1), None, [], [], [])


@pytest.mark.skipif(not _TRITON_OK, reason=f"triton backend unavailable: {_TRITON_WHY}")
def test_triton_rejects_non_contiguous():
    p = torch.randn(6, 5, device=TDEV).t()
    d = torch.randn(5, 6, device=TDEV)
    with pytest.raises(ValueError, match=r"params\[0\].*not contiguous"):
        ops.add_scaled_([p], [d], 0.1, backend="triton")
    with pytest.raises(ValueError, match=r"origins\[0\].*not laid out like params\[0\]"):
        ops.box_perturb_([d], [d.clone()], 1.0, 0.2, [torch.randn(6, 5, device=TDEV).t()], first=True,
                         backend="triton")
    with pytest.raises(ValueError, match=r"weights\[0\].*not laid out like tensors\[0\]"):
        ops.global_sqnorm([d], weights=[p], backend="triton")


# ----------------------------------------------------------------------------- torch.library
def _opcheck_cases(prefix, device):
    ps = [torch.randn(5, 3, device=device), torch.randn(33, device=device)]
    ds = [torch.randn_like(p) for p in ps]

    def fresh():
        return [torch.empty_like(p) for p in ps]
    sc = torch.tensor([0.1, 0.2], dtype=torch.float64, device=device)
    nd = torch.tensor([1.0, 2.0], dtype=torch.float64, device=device)
    op = getattr(torch.ops.awpfast, prefix + "add_scaled_").default
    yield op, ([p.clone() for p in ps], ds, [0.1, 0.2], None, 0.5, [], fresh(), fresh())
    yield op, ([p.clone() for p in ps], ds, [], sc, None, [p.clone() for p in ps], [], [])
    yield getattr(torch.ops.awpfast, prefix + "global_sqnorm").default, (ps, ds, 0.01)
    yield getattr(torch.ops.awpfast, prefix + "global_sqnorm").default, (ps, [], 0.0)
    yield getattr(torch.ops.awpfast, prefix + "asam_apply_").default, ([p.clone() for p in ps], ds, [], sc, 0.01,
                                                                       fresh())
    op = getattr(torch.ops.awpfast, prefix + "box_perturb_").default
    yield op, ([p.clone() for p in ps], ds, [1.0, 0.5], [0.2, 0.1], fresh(), True, 1e-6, None, None)
    yield op, ([p.clone() for p in ps], ds, [1.0, 0.5], [0.2, 0.1], [p.clone() for p in ps], False, 1e-6, nd, nd)


@kernels
def test_custom_ops_opcheck(kernel):
    backend, device = kernel
    for op, args in _opcheck_cases(backend + "_", device):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(bool(_NCPU_WHY), reason=_NCPU_WHY or "-")
def test_native_torch_compile_fullgraph():
    """The family ops are opaque custom ops under torch.compile: one graph, the eager bits."""
    shapes = [(5, 3), (7,), (native._C.CHUNK + 1,)]
    ps = [torch.randn(s) for s in shapes]
    ds = [torch.randn(s) * 1e-2 for s in shapes]

    def f(ps, ds, bs, os_):
        sq = native.global_sqnorm(ds, ps, 0.01)
        native.asam_apply_(ps, ds, (0.05 / (sq.sqrt() + 1e-12)).reshape(1).expand(len(ps)), 0.01, bs)
        native.restore_(ps, bs)
        native.add_scaled_(ps, ds, [0.1, 0.2, 0.3], 0.5, None, bs, None)
        dn = native.box_perturb_(ps, ds, [1.0] * 3, [0.2] * 3, os_, True, 1e-6, None)
        return sq * 2 + dn.sum()

    q, r = [p.clone() for p in ps], [p.clone() for p in ps]
    bq, br, oq, orr = _poison(ps), _poison(ps), _poison(ps), _poison(ps)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, ds, bq, oq)
    want = f(r, ds, br, orr)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(q + bq + oq, r + br + orr))


# ----------------------------------------------------------------------------- CUDA graphs and host syncs
@pytest.mark.skipif(not _TRITON_OK, reason=f"triton backend unavailable: {_TRITON_WHY}")
def test_triton_capture_path_builds_tables_without_caching(monkeypatch):
    """As inside a CUDA-graph capture (simulated on the interpreter): per-tensor float tables
    and new pointer tables are built by kernels for the call only, nothing enters the caches,
    and the results equal an eager call bit for bit."""
    old = T.set_config(**TRITON_SMALL)
    try:
        sizes = [15, 1, 0, 33, 65]
        ps, ds = _rand(sizes, torch.float32, TDEV), _rand(sizes, torch.float32, TDEV, 1e-3)
        lrs, aes = [0.5, 1.0, 0.2, 0.7, 0.9], [0.2, 0.1, 0.3, 0.25, 0.15]

        def run():
            p = [x.clone() for x in ps]
            os_ = _poison(p)
            dn = T.box_perturb_(p, ds, lrs, aes, os_, True, 1e-6, None)
            T.add_scaled_(p, ds, [0.1, 0.2, 0.3, 0.4, 0.5], 0.3, None, None, None)
            T.asam_apply_(p, ds, torch.full((5,), 0.2, device=TDEV), 0.01, None)
            return [dn, T.global_sqnorm(p, ds, 0.01)] + p + os_

        want = run()
        T.clear_cache()
        monkeypatch.setattr(T, "SIMULATE_CAPTURE", True)
        before = (len(T._ptr_tables.d), len(T._float_tables.d))
        got = run()
        assert (len(T._ptr_tables.d), len(T._float_tables.d)) == before
        _all_bits_equal(want, got)
    finally:
        T.set_config(**old)


def _cuda_backends():
    out = []
    if not _NCUDA_WHY:
        out.append("native")
    if _TRITON_OK and CUDA:
        out.append("triton")
    return out or [pytest.param("none", marks=pytest.mark.skip(reason="no CUDA device with family kernels"))]


@pytest.mark.parametrize("backend", _cuda_backends())
def test_cuda_family_no_host_sync_and_graph_capture(backend):
    sizes = [1000, 70000, 3, 0, 40000]
    ps, ds = _rand(sizes, torch.float32, "cuda"), _rand(sizes, torch.float32, "cuda", 1e-2)
    bs, os_ = [torch.empty_like(p) for p in ps], [torch.empty_like(p) for p in ps]
    orig = [p.clone() for p in ps]
    lrs = [0.5, 1.0, 0.2, 0.7, 0.9]

    def step():
        sq = ops.global_sqnorm(ds, weights=ps, eta=0.01, backend=backend)
        ops.asam_apply_(ps, ds, 0.05 / (sq.sqrt() + 1e-12), eta=0.01, backups=bs, backend=backend)
        ops.restore_(ps, bs, backend=backend)
        n2 = ops.global_sqnorm(ds, backend=backend)
        ops.add_scaled_(ps, ds, 0.05 / (n2.sqrt() + 1e-12), backups=bs, backend=backend)
        ops.restore_(ps, bs, backend=backend)
        dn = ops.box_perturb_(ps, ds, lrs, 0.2, os_, first=True, backend=backend)
        return sq, dn, [p.clone() for p in ps]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # eager warm-up (compiles kernels, caches tables)
        want_sq, want_dn, want_p = step()
        ops.restore_(ps, os_, backend=backend)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        ops.restore_(ps, os_, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sq, dn, got_p = step()
    for _ in range(2):
        ops.restore_(ps, orig, backend=backend)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(sq, want_sq) and torch.equal(dn, want_dn)
        assert all(torch.equal(a, b) for a, b in zip(got_p, want_p))
