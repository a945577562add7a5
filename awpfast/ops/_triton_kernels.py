"""Triton kernels of the ``triton`` backend (launchers live in ``triton.py``).

Multi-tensor layout
-------------------
All tensors of one (device, dtype) group are handled by ONE launch per pass, whatever
their number and sizes. A launch sees three small int64 tables in device memory:

* one *pointer table* per tensor list (params, directions, backups, deltas): the raw
  ``data_ptr`` of tensor ``t`` at slot ``t``. The kernel loads it and casts it to a typed
  pointer (the element type comes from ``PROTO``, any tensor of the group's dtype).
* ``TINFO[t] = (numel, chunk_len, first_chunk, n_chunks)`` per tensor;
* ``CTAB[c] = (tensor index, chunk start)`` per chunk: program ``c`` of a launch handles
  elements ``[start, min(start + chunk_len, numel))`` of one tensor.

Why this layout (rather than flat buffers or pointers as kernel arguments): flat buffers
would force the model's parameters to be views into one allocation (not drop-in); pointers
as kernel arguments cap the tensor count per launch and recompile for each count. Tables
cost one small host-to-device copy when a list of tensors is first seen; the launcher
caches them (pointer tables keyed on the data pointers, layouts keyed on the sizes), so the
steady state does no host work beyond a dict lookup and the launches are CUDA-graph
capturable (the tables are never built while a stream is capturing).

Chunks are multiples of ``BLOCK`` and start at multiples of ``BLOCK``; every tensor has at
least one chunk (an empty tensor gets one empty chunk, so its norm is written as 0) and at
most ``MAXK`` chunks (larger tensors get longer chunks). Offsets are int64 throughout, so
tensors beyond 2**31 elements are addressed correctly.

Reductions are deterministic two-stage sums without atomics: the reduce pass writes one
float64 partial per (quantity, chunk); every consumer sums the partials of a tensor in the
same fixed order (``_tensor_sum``), so each program of the apply pass recomputes the
same per-tensor norms bit for bit and derives the layer's scale on the device.

Precision. Element-wise math is fp32 (the interpreter has no bf16 arithmetic; fp32 is
also the accuracy contract). Squares are formed and summed in float64: a float32 square
underflows below ~1e-19 (and overflows above ~1.8e19), so a direction with ||g|| ~ 1e-20
would get norm 0 and a perturbation several times gamma ||w||. The per-tensor scalars
(norms, scale, projection factor) are computed in float64 too, where sqrt and division are
IEEE round-to-nearest (``tl.sqrt``/``/`` on fp32 compile to ``sqrt.approx.ftz.f32`` and
``div.full.f32``, which flush subnormals); the PGD L2 kernel uses ``tl.sqrt_rn`` and
``tl.div_rn`` for its fp32 per-element division. Per-tensor float tables hold float64.
Accumulators use ``tl.full`` rather than ``tl.zeros`` (a ``@jit`` helper of Triton's
standard library that cannot be re-decorated for the interpreter after Triton is imported);
for the same reason sums are ``tl.reduce(x, 0, _ADD)`` (exactly what ``tl.sum`` expands to).

Full blocks are loaded without a mask (and, when every base pointer is 16-byte aligned,
with divisibility hints) so the compiler can emit 128-bit accesses; only a tensor's last
partial block is masked.
"""
import triton
import triton.language as tl

try:  # tl.sum is a @jit helper; reducing with its combine function is the same code, and the
    # interpreter recognizes it by identity even when this module was re-decorated late
    from triton.language.standard import _sum_combine as _ADD
except ImportError:  # pragma: no cover - older/newer Triton layouts
    @triton.jit
    def _ADD(a, b):
        return a + b

# The kernels' MODE values, as ``tl.constexpr`` (a kernel may read a global only when it is one):
# ``MODE == A_ASCENT`` is a compile-time branch. Launchers pass ``.value`` (a plain int).
# reduce modes: which sums the reduce pass produces per chunk
R_NORM = tl.constexpr(0)       # P0=x                 q0 = sum x^2
R_PERTURB = tl.constexpr(1)    # P0=p, P1=d           q0 = sum p^2, q1 = sum d^2
R_ASCENT = tl.constexpr(2)     # P0=p, P1=w, P2=d     q0 = sum w^2, q1 = sum d^2, q2 = sum u^2, q3 = sum u*d (u = p - w)
R_PROJECT = tl.constexpr(3)    # P0=p, P1=w           q0 = sum w^2, q1 = sum u^2

# apply modes
A_PERTURB = tl.constexpr(0)    # P0=p, P1=d, P2=backup, P3=delta
A_RESTORE = tl.constexpr(1)    # P0=p, P1=backup
A_UNPERTURB = tl.constexpr(2)  # P0=p, P1=delta
A_ASCENT = tl.constexpr(3)     # P0=p, P1=w, P2=d
A_PROJECT = tl.constexpr(4)    # P0=p, P1=w


@triton.jit
def _base(PTAB, t, start, PROTO, ALIGNED: tl.constexpr):
    """Typed pointer to element ``start`` of tensor ``t`` of a pointer table."""
    p = tl.load(PTAB + t).to(PROTO.dtype)
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p + start


@triton.jit
def _chunk(TINFO, CTAB, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    t = tl.load(CTAB + 2 * c)
    start = tl.load(CTAB + 2 * c + 1)
    start = tl.multiple_of(start, BLOCK)
    size = tl.load(TINFO + 4 * t)
    clen = tl.load(TINFO + 4 * t + 1)
    n = tl.maximum(tl.minimum(start + clen, size) - start, 0)
    return c, t, start, n


@triton.jit
def _ld(ptr, offs, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.load(ptr + offs).to(tl.float32)


@triton.jit
def _st(ptr, offs, val, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + offs, val.to(ptr.dtype.element_ty))


@triton.jit
def _ld64(ptr, offs, mask, MASKED: tl.constexpr):
    return _ld(ptr, offs, mask, MASKED).to(tl.float64)


@triton.jit
def _reduce_block(a, b, c, offs, mask, acc0, acc1, acc2, acc3, MODE: tl.constexpr, MASKED: tl.constexpr):
    # squares and products in float64: no underflow/overflow of fp32 squares (see the module doc)
    if MODE == R_NORM:
        x = _ld64(a, offs, mask, MASKED)
        acc0 += x * x
    elif MODE == R_PERTURB:
        x = _ld64(a, offs, mask, MASKED)
        d = _ld64(b, offs, mask, MASKED)
        acc0 += x * x
        acc1 += d * d
    elif MODE == R_ASCENT:
        p = _ld64(a, offs, mask, MASKED)
        w = _ld64(b, offs, mask, MASKED)
        d = _ld64(c, offs, mask, MASKED)
        u = p - w
        acc0 += w * w
        acc1 += d * d
        acc2 += u * u
        acc3 += u * d
    else:  # R_PROJECT
        p = _ld64(a, offs, mask, MASKED)
        w = _ld64(b, offs, mask, MASKED)
        u = p - w
        acc0 += w * w
        acc1 += u * u
    return acc0, acc1, acc2, acc3


@triton.jit
def mt_reduce_kernel(P0, P1, P2, PROTO, TINFO, CTAB, PART, C,
                     MODE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Stage 1: per-chunk float64 partial sums, written to PART[q * C + c]."""
    c, t, start, n = _chunk(TINFO, CTAB, BLOCK)
    a = _base(P0, t, start, PROTO, ALIGNED)
    b = a
    cc = a
    if MODE != R_NORM:
        b = _base(P1, t, start, PROTO, ALIGNED)
    if MODE == R_ASCENT:
        cc = _base(P2, t, start, PROTO, ALIGNED)
    ar = tl.arange(0, BLOCK)
    acc0 = tl.full([BLOCK], 0.0, tl.float64)
    acc1 = tl.full([BLOCK], 0.0, tl.float64)
    acc2 = tl.full([BLOCK], 0.0, tl.float64)
    acc3 = tl.full([BLOCK], 0.0, tl.float64)
    nfull = (n // BLOCK) * BLOCK
    for o in range(0, nfull, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(o + ar, BLOCK), BLOCK)
        acc0, acc1, acc2, acc3 = _reduce_block(a, b, cc, offs, None, acc0, acc1, acc2, acc3, MODE, False)
    if nfull < n:
        offs = nfull + ar
        acc0, acc1, acc2, acc3 = _reduce_block(a, b, cc, offs, offs < n, acc0, acc1, acc2, acc3, MODE, True)
    tl.store(PART + c, tl.reduce(acc0, 0, _ADD))
    if MODE != R_NORM:
        tl.store(PART + C + c, tl.reduce(acc1, 0, _ADD))
    if MODE == R_ASCENT:
        tl.store(PART + 2 * C + c, tl.reduce(acc2, 0, _ADD))
        tl.store(PART + 3 * C + c, tl.reduce(acc3, 0, _ADD))


@triton.jit
def _tensor_sum(PART, q, C, first, nck, KB: tl.constexpr):
    """Sum of the partials of one tensor, always in the same order (deterministic)."""
    acc = tl.full([KB], 0.0, tl.float64)
    for k in range(0, nck, KB):
        idx = k + tl.arange(0, KB)
        acc += tl.load(PART + q * C + first + idx, mask=idx < nck, other=0.0)
    return tl.reduce(acc, 0, _ADD)


@triton.jit
def mt_norms_finalize_kernel(PART, TINFO, OUT, C, KB: tl.constexpr):
    """Stage 2 of ``norms``: one program per tensor, OUT[t] = sqrt(sum of partials) (float64
    sqrt, IEEE round-to-nearest; rounded once to OUT's dtype)."""
    t = tl.program_id(0).to(tl.int64)
    first = tl.load(TINFO + 4 * t + 2)
    nck = tl.load(TINFO + 4 * t + 3)
    tl.store(OUT + t, tl.sqrt(_tensor_sum(PART, 0, C, first, nck, KB)).to(OUT.dtype.element_ty))


@triton.jit
def _apply_block(a, b, c, e, offs, mask, s, f, MODE: tl.constexpr, HAS_B: tl.constexpr,
                 HAS_D: tl.constexpr, MASKED: tl.constexpr):
    if MODE == A_PERTURB:  # perturb: backup <- p; v = s*d; delta <- v; p <- p + v
        if MASKED:
            praw = tl.load(a + offs, mask=mask)
        else:
            praw = tl.load(a + offs)
        if HAS_B:
            if MASKED:
                tl.store(c + offs, praw, mask=mask)
            else:
                tl.store(c + offs, praw)
        v = s * _ld(b, offs, mask, MASKED)
        if HAS_D:
            _st(e, offs, v, mask, MASKED)
        _st(a, offs, praw.to(tl.float32) + v, mask, MASKED)
    elif MODE == A_RESTORE:  # restore: p <- backup (bit-exact, no conversion)
        if MASKED:
            tl.store(a + offs, tl.load(b + offs, mask=mask), mask=mask)
        else:
            tl.store(a + offs, tl.load(b + offs))
    elif MODE == A_UNPERTURB:  # unperturb: p <- p - delta
        _st(a, offs, _ld(a, offs, mask, MASKED) - _ld(b, offs, mask, MASKED), mask, MASKED)
    elif MODE == A_ASCENT:  # ascent: p <- w + ((p - w) + s*d) * f
        w = _ld(b, offs, mask, MASKED)
        v = (_ld(a, offs, mask, MASKED) - w) + s * _ld(c, offs, mask, MASKED)
        _st(a, offs, w + v * f, mask, MASKED)
    else:  # A_PROJECT: p <- w + (p - w) * f
        w = _ld(b, offs, mask, MASKED)
        _st(a, offs, w + (_ld(a, offs, mask, MASKED) - w) * f, mask, MASKED)


@triton.jit
def mt_apply_kernel(P0, P1, P2, P3, PROTO, TINFO, CTAB, PART, C, S0, S1, s0, s1, eps, OUT,
                    MODE: tl.constexpr, PER_TENSOR: tl.constexpr, HAS_B: tl.constexpr,
                    HAS_D: tl.constexpr, BLOCK: tl.constexpr, KB: tl.constexpr,
                    ALIGNED: tl.constexpr):
    """One elementwise pass; the per-layer scale is derived on the device from PART.

    ``s0``/``s1`` are the per-tensor floats (gamma; step_size and gamma for ascent), as
    scalars or, with PER_TENSOR, read from the float64 tables S0[t]/S1[t]. Programs whose chunk starts at 0
    write the direction norm of their tensor to OUT[t] (perturb and ascent).
    """
    c, t, start, n = _chunk(TINFO, CTAB, BLOCK)
    # per-tensor scalars in float64 (IEEE sqrt and division; see the module doc)
    g0 = tl.cast(s0, tl.float64)
    g1 = tl.cast(s1, tl.float64)
    if PER_TENSOR:
        g0 = tl.load(S0 + t)
        if MODE == A_ASCENT:
            g1 = tl.load(S1 + t)
    s64 = tl.full([], 0.0, tl.float64)
    f64 = tl.full([], 1.0, tl.float64)
    if MODE == A_PERTURB or MODE == A_ASCENT or MODE == A_PROJECT:
        first = tl.load(TINFO + 4 * t + 2)
        nck = tl.load(TINFO + 4 * t + 3)
        wn = tl.sqrt(_tensor_sum(PART, 0, C, first, nck, KB))
        q1 = _tensor_sum(PART, 1, C, first, nck, KB)
        if MODE == A_PERTURB:
            dn = tl.sqrt(q1)
            s64 = g0 * wn / (dn + tl.cast(eps, tl.float64))
            if start == 0:
                tl.store(OUT + t, dn.to(OUT.dtype.element_ty))
        elif MODE == A_ASCENT:
            dn = tl.sqrt(q1)
            s64 = g0 * wn / (dn + tl.cast(eps, tl.float64))
            # ||u + s d||^2 from the sums of the reduce pass (u = p - w)
            vn2 = _tensor_sum(PART, 2, C, first, nck, KB) + 2.0 * s64 * _tensor_sum(PART, 3, C, first, nck, KB) \
                + s64 * s64 * q1
            vn = tl.sqrt(tl.maximum(vn2, 0.0))
            f64 = tl.where(vn > 0.0, tl.minimum((g1 * wn) / tl.where(vn > 0.0, vn, 1.0), 1.0), 1.0)
            if start == 0:
                tl.store(OUT + t, dn.to(OUT.dtype.element_ty))
        else:
            vn = tl.sqrt(q1)
            f64 = tl.where(vn > 0.0, tl.minimum((g0 * wn) / tl.where(vn > 0.0, vn, 1.0), 1.0), 1.0)
    s = s64.to(tl.float32)
    f = f64.to(tl.float32)
    a = _base(P0, t, start, PROTO, ALIGNED)
    b = _base(P1, t, start, PROTO, ALIGNED)
    cc = a
    e = a
    if MODE == A_ASCENT or (MODE == A_PERTURB and HAS_B):
        cc = _base(P2, t, start, PROTO, ALIGNED)
    if MODE == A_PERTURB and HAS_D:
        e = _base(P3, t, start, PROTO, ALIGNED)
    ar = tl.arange(0, BLOCK)
    nfull = (n // BLOCK) * BLOCK
    for o in range(0, nfull, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(o + ar, BLOCK), BLOCK)
        _apply_block(a, b, cc, e, offs, None, s, f, MODE, HAS_B, HAS_D, False)
    if nfull < n:
        offs = nfull + ar
        _apply_block(a, b, cc, e, offs, offs < n, s, f, MODE, HAS_B, HAS_D, True)


@triton.jit
def pgd_linf_kernel(XA, G, X, N, alpha, eps, BLOCK: tl.constexpr):
    """x_adv <- clamp(x + clamp(x_adv + alpha*sign(g) - x, -eps, eps), 0, 1), one pass."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    xa = tl.load(XA + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    sgn = tl.where(g > 0.0, 1.0, tl.where(g < 0.0, -1.0, 0.0))
    xa = xa + alpha * sgn
    delta = tl.minimum(tl.maximum(xa - x, -eps), eps)
    out = tl.minimum(tl.maximum(x + delta, 0.0), 1.0)
    tl.store(XA + offs, out.to(XA.dtype.element_ty), mask=mask)


@triton.jit
def pgd_l2_kernel(XA, G, X, R, alpha, eps, BLOCK: tl.constexpr):
    """One program per sample (row of R elements), three sweeps over the row in one launch:
    ||g||; ||delta|| of the stepped point; the renormalized, box-clamped write. The second
    and third sweeps mostly hit cache; the result matches the eager sequence exactly in
    structure (no algebraic expansion of ||delta||). Squares are summed in float64 and the
    norms are float64 IEEE square roots; the per-element division ``alpha * g / ||g||`` is
    ``tl.div_rn`` (round-to-nearest, no flush of subnormals, like the eager division)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * R
    ar = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK], 0.0, tl.float64)
    for o in range(0, R, BLOCK):
        offs = base + o + ar
        m = (o + ar) < R
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float64)
        acc += g * g
    gn = (tl.sqrt(tl.reduce(acc, 0, _ADD)) + 1e-10).to(tl.float32)
    acc = tl.full([BLOCK], 0.0, tl.float64)
    for o in range(0, R, BLOCK):
        offs = base + o + ar
        m = (o + ar) < R
        xa = tl.load(XA + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        d = ((xa + tl.div_rn(alpha * g, gn)) - x).to(tl.float64)
        acc += d * d
    dn = tl.sqrt(tl.reduce(acc, 0, _ADD))
    f = tl.minimum(tl.cast(eps, tl.float64) / dn, 1.0).to(tl.float32)  # dn == 0 -> inf -> 1
    for o in range(0, R, BLOCK):
        offs = base + o + ar
        m = (o + ar) < R
        xa = tl.load(XA + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        d = (xa + tl.div_rn(alpha * g, gn)) - x
        out = tl.minimum(tl.maximum(x + d * f, 0.0), 1.0)
        tl.store(XA + offs, out.to(XA.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------- weight-perturbation family
# family apply modes (mt_family_apply_kernel)
F_ADD = tl.constexpr(0)   # P0=p, P1=d, P2=backup, P3=delta, P4=base: p <- (base or p) + s*clamp(d); backup, delta
F_ASAM = tl.constexpr(1)  # P0=p, P1=d, P2=backup: p <- p + (s*T^2)*d, T = |p| + eta (before the write)
F_BOX = tl.constexpr(2)   # P0=p, P1=d, P2=origin: p <- clamp(p + s*d, o - ae|o|, o + ae|o|); origin <- p if FIRST


@triton.jit
def _clampv(x, lo, hi):
    """clamp that lets NaN in ``x`` through (as torch.clamp and the CPU kernels do)."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _sqnorm_block(a, w, offs, mask, eta, acc, WEIGHTED: tl.constexpr, MASKED: tl.constexpr):
    x = _ld(a, offs, mask, MASKED)
    if WEIGHTED:
        x = (tl.abs(_ld(w, offs, mask, MASKED)) + eta) * x
    x64 = x.to(tl.float64)
    return acc + x64 * x64


@triton.jit
def mt_sqnorm_kernel(P0, P1, PROTO, TINFO, CTAB, PART, eta,
                     WEIGHTED: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """global_sqnorm, stage 1: PART[c] = sum over chunk c of (T x)^2 with T = |w| + eta (the
    product in fp32, the square and the sum in float64); T = 1 without WEIGHTED."""
    c, t, start, n = _chunk(TINFO, CTAB, BLOCK)
    a = _base(P0, t, start, PROTO, ALIGNED)
    w = a
    if WEIGHTED:
        w = _base(P1, t, start, PROTO, ALIGNED)
    ar = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK], 0.0, tl.float64)
    nfull = (n // BLOCK) * BLOCK
    for o in range(0, nfull, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(o + ar, BLOCK), BLOCK)
        acc = _sqnorm_block(a, w, offs, None, eta, acc, WEIGHTED, False)
    if nfull < n:
        offs = nfull + ar
        acc = _sqnorm_block(a, w, offs, offs < n, eta, acc, WEIGHTED, True)
    tl.store(PART + c, tl.reduce(acc, 0, _ADD))


@triton.jit
def sum_partials_kernel(PART, C, OUT, KB: tl.constexpr):
    """global_sqnorm, stage 2 (one program): OUT[0] = the sum of PART[0:C] in a fixed order."""
    acc = tl.full([KB], 0.0, tl.float64)
    for k in range(0, C, KB):
        idx = k + tl.arange(0, KB)
        acc += tl.load(PART + idx, mask=idx < C, other=0.0)
    tl.store(OUT, tl.reduce(acc, 0, _ADD).to(OUT.dtype.element_ty))


@triton.jit
def _family_block(a, b, cc, e, f, offs, mask, s, x1, clip, eta, ok,
                  MODE: tl.constexpr, HAS_B: tl.constexpr, HAS_D: tl.constexpr, HAS_BASE: tl.constexpr,
                  CLIP: tl.constexpr, FIRST: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        praw = tl.load(a + offs, mask=mask)
    else:
        praw = tl.load(a + offs)
    if MODE == F_ADD:  # add_scaled: backup <- p; v = s * clamp(d); delta <- v; p <- (base or p) + v
        if HAS_B:
            if MASKED:
                tl.store(cc + offs, praw, mask=mask)
            else:
                tl.store(cc + offs, praw)
        d = _ld(b, offs, mask, MASKED)
        if CLIP:
            d = _clampv(d, -clip, clip)
        v = s * d
        if HAS_D:
            _st(e, offs, v, mask, MASKED)
        if HAS_BASE:
            start = _ld(f, offs, mask, MASKED)
        else:
            start = praw.to(tl.float32)
        _st(a, offs, start + v, mask, MASKED)
    elif MODE == F_ASAM:  # asam: backup <- p; p <- p + (s * T^2) * d, T = |p| + eta
        if HAS_B:
            if MASKED:
                tl.store(cc + offs, praw, mask=mask)
            else:
                tl.store(cc + offs, praw)
        w = praw.to(tl.float32)
        tt = tl.abs(w) + eta
        _st(a, offs, w + (s * (tt * tt)) * _ld(b, offs, mask, MASKED), mask, MASKED)
    else:  # F_BOX: origin <- p (FIRST); p <- clamp(p + s*d, o - x1|o|, o + x1|o|) where ok, else p unchanged
        if FIRST:
            if MASKED:
                tl.store(cc + offs, praw, mask=mask)
            else:
                tl.store(cc + offs, praw)
            o = praw.to(tl.float32)
        else:
            o = _ld(cc, offs, mask, MASKED)
        r = x1 * tl.abs(o)
        x = praw.to(tl.float32) + s * _ld(b, offs, mask, MASKED)
        new = _clampv(x, o - r, o + r).to(praw.dtype)
        out = tl.where(ok, new, praw)
        if MASKED:
            tl.store(a + offs, out, mask=mask)
        else:
            tl.store(a + offs, out)


@triton.jit
def mt_family_apply_kernel(P0, P1, P2, P3, P4, PROTO, TINFO, CTAB, PART, C, S0, S1, s0, s1, clip, eta, eps,
                           ND, NW, OUT,
                           MODE: tl.constexpr, T0: tl.constexpr, T1: tl.constexpr, HAS_B: tl.constexpr,
                           HAS_D: tl.constexpr, HAS_BASE: tl.constexpr, CLIP: tl.constexpr,
                           FIRST: tl.constexpr, GIVEN: tl.constexpr, BLOCK: tl.constexpr, KB: tl.constexpr,
                           ALIGNED: tl.constexpr):
    """One elementwise pass of a family op (``MODE``: F_ADD, F_ASAM, F_BOX).

    ``s0``/``s1`` are per-tensor floats (the scale; for Box AWP adv_lr and adv_eps) as scalars
    or, with T0/T1, read from the float64 tables S0[t]/S1[t] (a scale tensor computed on the
    device is such a table: no host sync). Box AWP derives its per-tensor scale
    ``adv_lr (||p|| + eps) / (||d|| + eps)`` on the device from the partials of
    ``mt_reduce_kernel`` (R_PERTURB) or, with GIVEN, from the float64 norms ND[t], NW[t]; both
    norms are rounded to float32 first (the reference's norms), a zero or non-finite
    direction norm leaves the tensor unchanged, and programs whose chunk starts at 0 write
    the direction norm to OUT[t].
    """
    c, t, start, n = _chunk(TINFO, CTAB, BLOCK)
    g0 = tl.cast(s0, tl.float64)
    g1 = tl.cast(s1, tl.float64)
    if T0:
        g0 = tl.load(S0 + t)
    if T1:
        g1 = tl.load(S1 + t)
    s64 = g0
    ok = tl.full([], 1, tl.int1)
    if MODE == F_BOX:
        if GIVEN:
            gn = tl.load(ND + t)
            wn = tl.load(NW + t)
        else:
            first = tl.load(TINFO + 4 * t + 2)
            nck = tl.load(TINFO + 4 * t + 3)
            wn = tl.sqrt(_tensor_sum(PART, 0, C, first, nck, KB))
            gn = tl.sqrt(_tensor_sum(PART, 1, C, first, nck, KB))
        gn = gn.to(tl.float32).to(tl.float64)
        wn = wn.to(tl.float32).to(tl.float64)
        ok = ((gn - gn) == 0.0) & (gn != 0.0)  # finite and non-zero
        e64 = tl.cast(eps, tl.float64)
        s64 = tl.where(ok, g0 * (wn + e64) / tl.where(ok, gn + e64, 1.0), 0.0)
        if start == 0:
            tl.store(OUT + t, gn.to(OUT.dtype.element_ty))
    s = s64.to(tl.float32)
    x1 = g1.to(tl.float32)
    a = _base(P0, t, start, PROTO, ALIGNED)
    b = _base(P1, t, start, PROTO, ALIGNED)
    cc = a
    e = a
    f = a
    if HAS_B or MODE == F_BOX:
        cc = _base(P2, t, start, PROTO, ALIGNED)
    if HAS_D:
        e = _base(P3, t, start, PROTO, ALIGNED)
    if HAS_BASE:
        f = _base(P4, t, start, PROTO, ALIGNED)
    ar = tl.arange(0, BLOCK)
    nfull = (n // BLOCK) * BLOCK
    for o in range(0, nfull, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(o + ar, BLOCK), BLOCK)
        _family_block(a, b, cc, e, f, offs, None, s, x1, clip, eta, ok,
                      MODE, HAS_B, HAS_D, HAS_BASE, CLIP, FIRST, False)
    if nfull < n:
        offs = nfull + ar
        _family_block(a, b, cc, e, f, offs, offs < n, s, x1, clip, eta, ok,
                      MODE, HAS_B, HAS_D, HAS_BASE, CLIP, FIRST, True)


_BIAS32 = 4294967296  # 2**32


@triton.jit(do_not_specialize=["start", "n", "h0", "l0", "h1", "l1", "h2", "l2", "h3", "l3", "h4", "l4", "h5",
                               "l5", "h6", "l6", "h7", "l7"])
def fill_i64_kernel(OUT, start, n, h0, l0, h1, l1, h2, l2, h3, l3, h4, l4, h5, l5, h6, l6, h7, l7):
    """OUT[start + k] <- value k for k < n (up to 8 values per launch), each int64 value passed
    as its two 32-bit halves plus 2**32 (so every argument is an int64 of one fixed type and
    no value triggers a new specialization). Builds launch tables from kernel arguments
    alone - no host-to-device copy - so it can run inside a CUDA-graph capture, where the
    values become part of the graph."""
    o = OUT + start
    tl.store(o + 0, ((h0 - 4294967296) << 32) | (l0 - 4294967296), mask=n > 0)
    tl.store(o + 1, ((h1 - 4294967296) << 32) | (l1 - 4294967296), mask=n > 1)
    tl.store(o + 2, ((h2 - 4294967296) << 32) | (l2 - 4294967296), mask=n > 2)
    tl.store(o + 3, ((h3 - 4294967296) << 32) | (l3 - 4294967296), mask=n > 3)
    tl.store(o + 4, ((h4 - 4294967296) << 32) | (l4 - 4294967296), mask=n > 4)
    tl.store(o + 5, ((h5 - 4294967296) << 32) | (l5 - 4294967296), mask=n > 5)
    tl.store(o + 6, ((h6 - 4294967296) << 32) | (l6 - 4294967296), mask=n > 6)
    tl.store(o + 7, ((h7 - 4294967296) << 32) | (l7 - 4294967296), mask=n > 7)


FILL_PER_LAUNCH = 8


def fill_args(values):
    """The (h, l) argument pairs of ``fill_i64_kernel`` for up to 8 int64 values."""
    out = []
    for v in list(values) + [0] * (FILL_PER_LAUNCH - len(values)):
        u = int(v) & 0xFFFFFFFFFFFFFFFF
        out += [(u >> 32) + _BIAS32, (u & 0xFFFFFFFF) + _BIAS32]
    return out
