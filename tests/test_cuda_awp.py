"""AWP, the attacks and the seam on CUDA (run by benchmarks/gpu_check.py on a GPU machine;
skipped without CUDA, each test naming why).

* a full AWP training step - the ascent gradients produced by ``torch.autograd.grad`` inside
  the capture, the perturbation, the descent backward, the base SGD step and the restore -
  captured into one CUDA graph with each GPU backend (triton, native, and foreach as the
  fallback) and replayed against the same steps run eagerly;
* AWP training steps and PGD attacks on CUDA with every backend against the reference backend;
* two streams running seam ops on tensors of the same sizes at the same time (shared
  layouts, per-stream scratch, tables first built on another stream);
* the foreach backend on CUDA keeps PyTorch's multi-tensor fast path (kernel count).
"""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import awpfast
import awpfast.ops as ops
from conftest import cuda_reason, rel_err

CUDA = torch.cuda.is_available()
# AWPFAST_CUDA_TESTS_ON_CPU=1 runs the tests that need no CUDA-only feature on the CPU (a check
# of the tests themselves before a GPU session); normally everything here needs CUDA.
ON_CPU = os.environ.get("AWPFAST_CUDA_TESTS_ON_CPU") == "1"
pytestmark = pytest.mark.skipif(not CUDA and not ON_CPU, reason="needs a CUDA device (run by benchmarks/gpu_check.py)")
DEV = torch.device("cuda") if CUDA and not ON_CPU else torch.device("cpu")
needs_cuda = pytest.mark.skipif(DEV.type != "cuda", reason="CUDA graphs / streams / the CUDA profiler need CUDA")


def _gpu_backends(names=("triton", "native", "foreach")):
    out = []
    for b in names:
        if DEV.type == "cpu":
            mod, ok, why = ops._import(b)
            why = "" if ok and mod.supports_device(DEV) else f"{b} cannot run on the CPU here"
        else:
            why = cuda_reason(b)
        out.append(pytest.param(b, marks=pytest.mark.skipif(bool(why), reason=why or "ok")))
    return out


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).to(DEV)


@pytest.fixture(autouse=True)
def _deterministic():
    if DEV.type != "cuda":
        yield
        return
    old = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
           torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = old


class Stepper:
    """One AT-AWP-style training step on a fixed-address batch (what a graph captures)."""

    def __init__(self, model, backend, steps=1, restore="after_step", dtype=torch.float32):
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.awp = awpfast.AWP(self.opt, model, gamma=0.01, steps=steps, restore=restore, backend=backend)
        self.x = torch.zeros(8, 3, 16, 16, device=DEV, dtype=dtype)
        self.y = torch.zeros(8, dtype=torch.long, device=DEV)
        self.loss = torch.zeros((), device=DEV)

    def step(self):
        model, x, y = self.model, self.x, self.y
        model.train()
        self.awp.perturb(lambda: F.cross_entropy(model(x), y))  # autograd.grad inside
        self.awp.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        self.awp.step()
        self.loss.copy_(loss.detach())

    def load(self, x, y):
        self.x.copy_(x)
        self.y.copy_(y)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(8, 3, 16, 16, generator=g).to(DEV), torch.randint(0, 10, (8,), generator=g).to(DEV))
            for _ in range(n)]


def _max_rel(m1, m2):
    worst = 0.0
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        if a.is_floating_point() and a.numel():
            worst = max(worst, float((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-30)))
    return worst


@needs_cuda
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("steps,restore", [(1, "after_step"), (2, "before_step")])
def test_capture_full_awp_step(backend, steps, restore):
    """Capture a whole AWP training step (ascent gradients included) into one CUDA graph and
    replay it on new batches: the weights follow the eager run of the same steps."""
    base = _model()
    eager, graphed = Stepper(copy.deepcopy(base), backend, steps, restore), \
        Stepper(copy.deepcopy(base), backend, steps, restore)
    data = _batches(6)
    # warm-up (3 eager steps on a side stream, both copies): kernels compiled, launch tables
    # cached, optimizer momentum buffers created - what any capture needs
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:3]:
            for s in (eager, graphed):
                s.load(x, y)
                s.step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert _max_rel(eager.model, graphed.model) == 0.0
    graphed.awp.zero_grad(set_to_none=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        graphed.step()
    for x, y in data[3:]:
        graphed.load(x, y)
        g.replay()
        eager.load(x, y)
        eager.step()
        torch.cuda.synchronize()
        assert torch.isfinite(graphed.loss) and abs(float(graphed.loss) - float(eager.loss)) <= 1e-5 * abs(float(eager.loss))
        err = _max_rel(eager.model, graphed.model)
        assert err <= 1e-5, f"replay differs from eager by {err:.3g} (relative)"
    assert not graphed.awp.is_perturbed


@pytest.mark.parametrize("backend", _gpu_backends(("foreach", "triton", "native")))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_awp_steps_on_cuda_match_reference_backend(backend, dtype):
    if DEV.type == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton CPU interpreter truncates fp32 -> bf16 (compiled kernels round to nearest)")
    base = _model().to(dtype)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    sa, sb = Stepper(a, backend, dtype=dtype), Stepper(b, "reference", dtype=dtype)
    # bf16: one step (later steps amplify bf16 rounding differences through BatchNorm)
    for x, y in _batches(3 if dtype == torch.float32 else 1):
        for s in (sa, sb):
            s.load(x, y)
            s.step()
    assert _max_rel(a, b) <= (1e-5 if dtype == torch.float32 else 2e-2)
    assert _max_rel(a, base) > 1e-4, "the weights must have moved"


@pytest.mark.parametrize("backend", _gpu_backends(("foreach", "triton", "native")))
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_attack_on_cuda_matches_reference_backend(backend, norm):
    from awpfast.attacks import PGD
    model = _model().eval()
    x, y = _batches(1)[0]
    eps, alpha = (8 / 255, 2 / 255) if norm == "Linf" else (0.5, 0.1)
    torch.manual_seed(5)
    got = PGD(model, eps=eps, alpha=alpha, steps=5, norm=norm, backend=backend)(x, y)
    torch.manual_seed(5)
    want = PGD(model, eps=eps, alpha=alpha, steps=5, norm=norm, backend="reference")(x, y)
    # L-inf: the same operations as the reference, expected bitwise; a rare sign flip of a
    # near-zero gradient element moves one element by alpha (~1.7e-4 here)
    assert rel_err(got, want) < (1e-3 if norm == "Linf" else 1e-5)
    d = (got - x).reshape(8, -1)
    assert float(got.min()) >= 0 and float(got.max()) <= 1
    assert float(d.abs().max() if norm == "Linf" else d.norm(dim=1).max()) <= eps * (1 + 1e-5)


@needs_cuda
@pytest.mark.parametrize("backend", _gpu_backends(("triton", "native", "foreach")))
def test_two_streams_same_sizes(backend):
    """Two streams run perturb/restore on different tensors of the same sizes at the same
    time (one layout, so scratch and tables are shared unless they are per stream); the
    second stream also reads tables first built on the first one."""
    shapes = [(256, 128, 3, 3), (4097,), (10, 640), (1,)]
    sets = []
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        ps = [torch.randn(s, generator=g).to(DEV) for s in shapes]
        ds = [torch.randn(s, generator=g).to(DEV) * 1e-3 for s in shapes]
        sets.append((ps, ds, [p.clone() for p in ps]))
    want = []
    for ps, ds, orig in sets:
        rp = [p.double().cpu() for p in orig]
        ops.perturb_(rp, [d.double().cpu() for d in ds], 0.01, backend="reference")
        want.append(rp)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    ps0, ds0, _ = sets[0]
    bs0 = [torch.empty_like(p) for p in ps0]
    with torch.cuda.stream(s1):  # tables built on s1
        ops.perturb_(ps0, ds0, 0.01, backups=bs0, backend=backend)
        ops.restore_(ps0, bs0, backend=backend)
    for it in range(5):
        outs = []
        for (ps, ds, orig), st in zip(sets, (s1, s2)) if it % 2 == 0 else zip(sets, (s2, s1)):
            st.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(st):
                bs = [torch.empty_like(p) for p in ps]
                dn = ops.perturb_(ps, ds, 0.01, backups=bs, backend=backend)
                snap = [p.clone() for p in ps]
                ops.restore_(ps, bs, backend=backend)
            outs.append((snap, dn, bs, st))
        torch.cuda.synchronize()
        for (snap, dn, bs, st), (ps, ds, orig), rp in zip(outs, sets, want):
            for a, r in zip(snap, rp):
                assert rel_err(a, r) < 1e-6
            assert all(torch.equal(p, o) for p, o in zip(ps, orig))
            assert rel_err(dn, torch.stack([d.double().norm() for d in ds])) < 1e-6


@needs_cuda
def test_foreach_on_cuda_is_multi_tensor():
    """The foreach backend's perturb_ over 200 tensors launches far fewer than 200 kernels
    (a list of 0-dim scales would fall back to one launch per tensor)."""
    from torch.profiler import ProfilerActivity, profile
    shapes = [(int(n),) for n in torch.randint(1, 3000, (200,), generator=torch.Generator().manual_seed(0))]
    ps = [torch.randn(s, device=DEV) for s in shapes]
    ds = [torch.randn(s, device=DEV) for s in shapes]
    bs, vs = [torch.empty_like(p) for p in ps], [torch.empty_like(p) for p in ps]
    ops.perturb_(ps, ds, [0.01 + 1e-4 * i for i in range(200)], backups=bs, deltas=vs, backend="foreach")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ops.perturb_(ps, ds, [0.01 + 1e-4 * i for i in range(200)], backups=bs, deltas=vs, backend="foreach")
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if "CUDA" in str(getattr(e, "device_type", ""))
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    assert 0 < len(kernels) <= 60, f"{len(kernels)} kernels for 200 tensors: the per-tensor slow path?"


@needs_cuda
def test_tiny_norms_on_gpu():
    """Compiled kernels (not the interpreter): a direction norm of 1e-25 is exact with every
    GPU backend."""
    d = [torch.randn(10000, device=DEV) * 1e-27, torch.randn(7, device=DEV) * 3e-21]
    want = torch.stack([t.double().norm() for t in d]).cpu()
    for be in ("triton", "native", "foreach"):
        if cuda_reason(be):
            continue
        got = ops.norms(d, backend=be)
        assert rel_err(got, want) < 1e-6, be
        p = [torch.randn(10000, device=DEV), torch.randn(7, device=DEV)]
        dn = ops.perturb_([t.clone() for t in p], d, 0.01, backend=be)
        assert rel_err(dn, want) < 1e-6, be
