"""torch.compile smoke tests on the CPU (and on CUDA when present).

* every seam op compiles with ``fullgraph=True`` (no graph break) through the foreach and
  triton backends, the Triton custom ops included (interpreted on the CPU), and gives the
  eager result; the other backends are compiled with graph breaks allowed (smoke test);
* an Inductor-compiled perturb/restore matches eager;
* an AWP training step compiled by Dynamo has no graph break inside ``awpfast/ops`` and
  produces the eager step's weights (breaks elsewhere in awpfast are listed in the output).
"""
import os
import time
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:  # the triton backend runs on the CPU interpreter (must be set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import awpfast.ops as ops  # noqa: E402
from conftest import rel_err  # noqa: E402
from awpfast.optim import DYNAMO_TRACES_WRAPPER  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")


def _backends():
    names = ["reference", "foreach"]
    if "native" in ops.available_backends():
        names.append("native")
    try:
        from awpfast.ops import triton as T
        if not CUDA and os.environ.get("TRITON_INTERPRET") == "1":
            T._use_interpreter()
            getattr(ops, "_loaded", {}).pop("triton", None)
        if T.available()[0] and T.supports_device(DEV):
            names.append("triton")
    except ImportError:
        pass
    return names


BACKENDS = _backends()
SHAPES = [(5, 3), (40,), (2, 3, 3, 3), (1,)]


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1234)
    mk = lambda s: torch.randn(s, generator=g, dtype=torch.float32).to(device=DEV, dtype=dtype)  # noqa: E731
    ps = [mk(s) for s in SHAPES]
    ds = [mk(s) for s in SHAPES]
    return ps, ds


def _weight_ops(ps, ds, bs, vs, backend):
    """Every weight-side seam op once; returns the direction norms of both ascent ops."""
    n0 = ops.norms(ps, backend=backend)
    dn = ops.perturb_(ps, ds, 0.02, backups=bs, deltas=vs, backend=backend)
    dn2 = ops.ascent_step_(ps, bs, ds, 0.01, 0.02, backend=backend)
    ops.project_(ps, bs, 0.015, backend=backend)
    ops.unperturb_(ps, vs, backend=backend)   # ps - v (v from the first perturb)
    mid = [p.clone() for p in ps]
    ops.restore_(ps, bs, backend=backend)
    return n0, dn, dn2, mid


def _pgd_ops(xa, g, x, backend):
    a = xa.clone()
    ops.pgd_step_(a, g, x, 2 / 255, 8 / 255, "Linf", backend=backend)
    b = xa.clone()
    ops.pgd_step_(b, g, x, 0.05, 0.3, "L2", backend=backend)
    return a, b


# The production paths must compile without graph breaks. The reference oracle branches on
# data (float(norm) > 0) and is only smoke-tested (graph breaks allowed), like any backend
# not listed here.
FULLGRAPH = {"foreach", "triton"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_seam_ops_fullgraph(backend):
    torch._dynamo.reset()
    full = backend in FULLGRAPH
    ps, ds = _data()
    results = []
    for compiled in (False, True):
        p = [t.clone() for t in ps]
        bs, vs = [torch.full_like(t, float("nan")) for t in p], [torch.full_like(t, float("nan")) for t in p]
        # eager first: warms the seam's lazy backend import (importlib is not traceable)
        fn = torch.compile(_weight_ops, backend="aot_eager", fullgraph=full) if compiled else _weight_ops
        n0, dn, dn2, mid = fn(p, ds, bs, vs, backend)
        results.append((n0, dn, dn2, mid, p))
    (e_n0, e_dn, e_dn2, e_mid, e_p), (c_n0, c_dn, c_dn2, c_mid, c_p) = results
    assert rel_err(c_n0, e_n0) < 1e-6 and rel_err(c_dn, e_dn) < 1e-6 and rel_err(c_dn2, e_dn2) < 1e-6
    for a, b in zip(c_mid, e_mid):
        assert rel_err(a, b) < 1e-6
    for a, b in zip(c_p, ps):
        assert torch.equal(a, b), "restore must be bit-exact under compile"

    x = torch.rand(4, 3, 5, 5, device=DEV)
    xa = (x + 0.01 * torch.randn_like(x)).clamp(0, 1)
    g = torch.randn_like(x)
    e = _pgd_ops(xa, g, x, backend)
    c = torch.compile(_pgd_ops, backend="aot_eager", fullgraph=full)(xa, g, x, backend)
    for a, b in zip(c, e):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("backend", [b for b in ("foreach", "triton") if b in BACKENDS])
def test_inductor_perturb_restore(backend):
    torch._dynamo.reset()

    def step(ps, ds, bs):
        dn = ops.perturb_(ps, ds, 0.01, backups=bs, backend=backend)
        s = torch.stack([(p.float() * p.float()).sum() for p in ps]).sum()
        ops.restore_(ps, bs, backend=backend)
        return dn, s

    ps, ds = _data()
    p1 = [t.clone() for t in ps]
    e_dn, e_s = step(p1, ds, [torch.empty_like(t) for t in ps])
    t0 = time.time()
    try:
        f = torch.compile(step, backend="inductor", fullgraph=True)
        p2 = [t.clone() for t in ps]
        c_dn, c_s = f(p2, ds, [torch.empty_like(t) for t in ps])
    except Exception as e:  # no C++ toolchain for Inductor's CPU code
        if not CUDA and ("CppCompileError" in type(e).__name__ or "InvalidCxxCompiler" in type(e).__name__):
            pytest.skip(f"Inductor cannot build CPU code here: {type(e).__name__}")
        raise
    if time.time() - t0 > 120:
        warnings.warn(f"Inductor compile took {time.time() - t0:.0f} s", RuntimeWarning)
    assert rel_err(c_dn, e_dn) < 1e-6 and rel_err(c_s, e_s) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(p2, ps))


def _awp_setup(backend, cls=None):
    from awpfast.optim import AWP
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).to(DEV)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    return m, opt, (cls or AWP)(opt, m, gamma=0.01, backend=backend)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(8, 3, 6, 6, generator=g).to(DEV), torch.randint(0, 5, (8,), generator=g).to(DEV)


def _make_step(m, opt, awp):
    """One AWP training step (perturb, descent at w + v, step), as a user writes it."""
    def step(x, y):
        awp.perturb(lambda: F.cross_entropy(m(x), y))
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        awp.step()
        return loss
    return step


@pytest.mark.parametrize("backend", [b for b in ("foreach", "triton") if b in BACKENDS])
def test_awp_step_under_dynamo(backend):
    """A whole AWP training step under Dynamo: same weights as eager, and no graph break
    in awpfast except at torch.autograd.grad, which Dynamo does not trace by default (its
    ``trace_autograd_ops`` switch changes plain SGD training results in torch 2.13, so awpfast
    does not rely on it)."""
    torch._dynamo.reset()
    x, y = _batch(7)

    weights = []
    for compiled in (False, True):
        m, opt, awp = _awp_setup(backend)
        step = _make_step(m, opt, awp)
        if compiled:
            ex = torch._dynamo.explain(step)(x, y)  # runs the step once, compiled
            step(x, y)
        else:
            step(x, y)
            step(x, y)
        weights.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*weights):
        assert rel_err(a, b) < 1e-5

    in_awpfast = []
    for r in ex.break_reasons:
        frames = [f for f in r.user_stack if "/awpfast/" in f.filename.replace(os.sep, "/")]
        reason = r.reason.splitlines()[0][:160]
        if frames and "autograd.grad" not in reason:
            in_awpfast.append((reason, [f"{os.path.relpath(f.filename)}:{f.lineno}" for f in frames]))
    if DYNAMO_TRACES_WRAPPER:
        assert not in_awpfast, f"graph breaks inside awpfast: {in_awpfast}"


@pytest.mark.parametrize("backend", [b for b in ("foreach", "triton") if b in BACKENDS])
def test_compiled_perturb_skips_nonfinite_on_device(backend):
    """In compiled code the non-finite check has no host sync: a non-finite ascent gradient
    leaves the weights exactly at w, and the skip is counted on the device."""
    torch._dynamo.reset()
    m, opt, awp = _awp_setup(backend)
    x = torch.rand(8, 3, 6, 6).to(DEV)
    y = torch.randint(0, 5, (8,)).to(DEV)
    scale = torch.ones((), device=DEV)
    w0 = [p.detach().clone() for p in m.parameters()]

    def perturb(x, y):
        awp.perturb(lambda: F.cross_entropy(m(x), y) * scale)

    # the code after torch.autograd.grad's graph break is compiled: no host sync there
    ex = torch._dynamo.explain(perturb)(x, y)
    breaks = [r.reason.splitlines()[0] for r in ex.break_reasons if "autograd.grad" not in r.reason]
    if DYNAMO_TRACES_WRAPPER:  # before torch 2.13 perturb() runs eagerly (see awpfast.optim)
        assert not breaks, breaks
    assert awp.is_perturbed and awp.skipped_steps == 0
    assert any(not torch.equal(a, b) for a, b in zip(w0, m.parameters()))
    awp.restore()
    scale.fill_(float("inf"))
    torch._dynamo.explain(perturb)(x, y)
    assert awp.skipped_steps == 1
    for a, b in zip(w0, m.parameters()):
        assert torch.equal(a, b)
    awp.zero_grad()
    F.cross_entropy(m(x), y).backward()
    awp.step()  # the reference order subtracts v = 0: a plain step from w
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_awp_step_eager_fallback_under_dynamo():
    """The torch < 2.13 fallback (public methods kept out of Dynamo), forced on any torch: a
    compiled training step gives the eager step's weights."""
    from awpfast.optim import AWP, _eager_under_old_dynamo

    class EagerAWP(AWP):
        pass

    for name in ("perturb", "step", "restore"):
        setattr(EagerAWP, name, getattr(AWP, name))
    _eager_under_old_dynamo(EagerAWP, force=True)
    assert all(getattr(EagerAWP, n) is not getattr(AWP, n) for n in ("perturb", "step", "restore"))
    torch._dynamo.reset()
    x, y = _batch(3)
    weights = []
    for compiled in (False, True):
        m, opt, awp = _awp_setup("foreach", EagerAWP)
        step = _make_step(m, opt, awp)
        fn = torch.compile(step, backend="eager") if compiled else step
        fn(x, y)
        fn(x, y)
        assert not awp.is_perturbed
        weights.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*weights):
        assert rel_err(a, b) < 1e-5
