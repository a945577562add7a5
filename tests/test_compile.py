"""torch.compile smoke tests on the CPU (and on CUDA when present).

* every seam op compiles with ``fullgraph=True`` (no graph break) through the foreach and
  triton backends, the Triton custom ops included (interpreted on the CPU), and gives the
  eager result; the other backends are compiled with graph breaks allowed (smoke test);
* an Inductor-compiled perturb/restore matches eager;
* a whole compiled training step (PGD attack, ascent, descent, step) for AWP, SAM and Box AWP:
  the exact graph count, no fallback to eager in awpfast's frames and no graph break there but
  torch.autograd.grad, nothing compiled again at steps 2-5, the eager weights (fp32 1e-5,
  fp64 1e-10), all from Dynamo's own counters (awpfast.compiled.DynamoEvents).
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
from awpfast.compiled import DYNAMO_TRACES_WRAPPER  # noqa: E402

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
    from awpfast import AWP
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


# ------------------------------------------------------------------ a whole compiled step
# Dynamo's own counters (awpfast.compiled.DynamoEvents), not explain().break_reasons, which
# does not list the frames Dynamo gives up on ("falling back to eager").
#
# Graphs of one compiled training step on torch 2.13 (the step of _train_step below): every
# graph break comes from torch.autograd.grad (PGD's input gradient, the ascent gradient; Dynamo
# does not trace it: trace_autograd_ops=True gives wrong weights in 2.13), the base optimizer
# (its zero_grad, never traced, and the two torch._dynamo.graph_break() calls torch puts
# around every optimizer step) or the user's loss.backward(). The numbers change with torch.
EXPECTED_GRAPHS = {("AWP", True): 10, ("AWP", False): 8, ("SAM", False): 8, ("BoxAWP", False): 7}
ALLOWED_IN_AWPFAST = ("torch.autograd.grad",)


def _net(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 5)).to(DEV, dtype)


def _rule(name, opt, m):
    from awpfast import AWP, SAM, BoxAWP
    if name == "AWP":
        return AWP(opt, m, gamma=0.01, backend="foreach")
    if name == "SAM":
        return SAM(opt, m, rho=0.05, backend="foreach")
    return BoxAWP(opt, m, adv_lr=0.5, adv_eps=0.1, backend="foreach")


def _train_step(m, opt, wrapper, attack):
    """attack, ascent, descent and step: the function the docs compile (docs/compile.md)."""
    def step(x, y):
        x_adv = attack(x, y) if attack is not None else x
        wrapper.perturb(lambda: F.cross_entropy(m(x_adv), y))
        loss = F.cross_entropy(m(x_adv), y)
        opt.zero_grad()
        loss.backward()
        wrapper.step()
        return loss.detach()
    return step


def _run(rule, with_attack, dtype, compiled, steps=5, backend="eager"):
    from awpfast.attacks import PGD
    from awpfast.compiled import DynamoEvents, prime_base_state
    m = _net(dtype)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert prime_base_state(opt)
    w = _rule(rule, opt, m)
    atk = PGD(m, steps=2, random_start=False, check_range=False, backend="foreach") if with_attack else None
    fn = _train_step(m, opt, w, atk)
    events = []
    if compiled:
        fn = torch.compile(fn, backend=backend)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.rand(8, 3, 6, 6, generator=g).to(DEV, dtype)
        y = torch.randint(0, 5, (8,), generator=g).to(DEV)
        if compiled:
            with DynamoEvents() as ev:
                fn(x, y)
            events.append(ev)
        else:
            fn(x, y)
    params = [t.detach().clone() for t in m.parameters()] + [b.clone() for b in m.buffers()]
    return params, events


@pytest.mark.skipif(not DYNAMO_TRACES_WRAPPER, reason="torch < 2.13 runs the wrapper's methods eagerly")
@pytest.mark.parametrize("rule,with_attack", [("AWP", True), ("AWP", False), ("SAM", False), ("BoxAWP", False)])
def test_compiled_step_counts(rule, with_attack):
    """One compiled step: the exact graph count, no fallback to eager in an awpfast frame, no graph
    break in awpfast other than torch.autograd.grad; steps 2-5 compile nothing (no recompile)."""
    torch._dynamo.reset()
    _, events = _run(rule, with_attack, torch.float32, compiled=True)
    first, later = events[0], events[1:]
    assert first.in_package(first.fallbacks) == [], first.fallbacks
    bad = [b for b in first.in_package(first.breaks) if not any(a in b[1] for a in ALLOWED_IN_AWPFAST)]
    assert bad == [], bad
    assert first.graphs == EXPECTED_GRAPHS[(rule, with_attack)], (first.graphs, first.breaks)
    assert first.recompiles == []
    for k, ev in enumerate(later, 2):
        assert (ev.graphs, ev.frames, ev.recompiles, ev.fallbacks) == (0, 0, [], []), (k, ev.recompiles)


_F32, _F64 = (torch.float32, 1e-5), (torch.float64, 1e-10)
_SLOW = pytest.mark.slow  # the CI budget: fp32 for SAM and Box AWP under make test-all only


@pytest.mark.skipif(not DYNAMO_TRACES_WRAPPER, reason="torch < 2.13 runs the wrapper's methods eagerly")
@pytest.mark.parametrize("rule,with_attack,dtype,tol", [
    ("AWP", True, *_F32), ("AWP", True, *_F64), ("SAM", False, *_F64), ("BoxAWP", False, *_F64),
    pytest.param("SAM", False, *_F32, marks=_SLOW), pytest.param("BoxAWP", False, *_F32, marks=_SLOW)])
def test_compiled_step_equals_eager(rule, with_attack, dtype, tol):
    """Five compiled steps (Dynamo + AOTAutograd, ``aot_eager``) give the eager weights and
    BatchNorm statistics."""
    torch._dynamo.reset()
    eager, _ = _run(rule, with_attack, dtype, compiled=False)
    comp, _ = _run(rule, with_attack, dtype, compiled=True, backend="aot_eager")
    for a, b in zip(comp, eager):
        assert rel_err(a.double(), b.double()) < tol


@pytest.mark.slow
@pytest.mark.skipif(not DYNAMO_TRACES_WRAPPER, reason="torch < 2.13 runs the wrapper's methods eagerly")
def test_compiled_step_inductor_equals_eager():
    """The documented mode (Inductor, max-autotune-no-cudagraphs on the CPU): five AT-AWP steps
    equal eager to 1e-5 in fp32 (tens of seconds of compilation: slow)."""
    from awpfast.compiled import compile_mode
    torch._dynamo.reset()
    eager, _ = _run("AWP", True, torch.float32, compiled=False)
    try:
        comp, events = _run("AWP", True, torch.float32, compiled=True, backend="inductor")
    except Exception as e:  # no C++ toolchain for Inductor's CPU code
        if not CUDA and ("CppCompileError" in type(e).__name__ or "InvalidCxxCompiler" in type(e).__name__):
            pytest.skip(f"Inductor cannot build CPU code here: {type(e).__name__}")
        raise
    assert compile_mode(DEV) in ("reduce-overhead", "max-autotune-no-cudagraphs")
    for a, b in zip(comp, eager):
        assert rel_err(a, b) < 1e-5
    assert all((ev.graphs, ev.recompiles) == (0, []) for ev in events[1:])


def test_prime_base_state():
    """SGD with momentum (dampening 0): zero buffers give the first step exactly; anything else
    is left alone."""
    from awpfast.compiled import prime_base_state
    torch.manual_seed(0)
    outs = []
    for prime in (False, True):
        m = nn.Linear(4, 3).double()
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.arange(p.numel(), dtype=torch.float64).view_as(p) / 7 - 0.5)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        if prime:
            assert prime_base_state(opt) and not prime_base_state(opt)  # once state exists: no
        for k in range(3):
            opt.zero_grad()
            m(torch.ones(2, 4, dtype=torch.float64) * (k + 1)).pow(2).sum().backward()
            opt.step()
        outs.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    m = nn.Linear(2, 2)
    assert not prime_base_state(torch.optim.SGD(m.parameters(), lr=0.1))                    # no momentum
    assert not prime_base_state(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, dampening=0.1))
    assert not prime_base_state(torch.optim.Adam(m.parameters()))


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
    from awpfast import AWP
    from awpfast.compiled import _eager_under_old_dynamo

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
