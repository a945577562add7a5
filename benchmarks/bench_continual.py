"""Time one FS-DGPM update: awpfast's FS step (seam ops, closed-form soft-weight gradient)
against the straightforward fast-weights implementation (a functional forward, autograd
through the soft weights), on the PMNIST MLP 784-100-100-10 with GPM bases in every layer.

    python benchmarks/bench_continual.py [--json PATH] [--threads 1] [--reps 200]

Prints medians (ms) and writes JSON. Both paths compute the same gradients (checked here
and in tests/test_continual.py).
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from awpfast.continual import GPMMemory, fs_step, mlp


def straightforward(net, params, mem, lam, chunks, meta, eta1, clip):
    names = [n for n, _ in net.named_parameters()]
    lam = [l.clone().requires_grad_(True) for l in lam]
    fast = list(params)
    metas = []
    for x, y in chunks:
        g = torch.autograd.grad(F.cross_entropy(functional_call(net, dict(zip(names, fast)), (x,)), y), fast)
        d = [((gi @ M) * l) @ M.t() for gi, M, l in zip(g, mem.bases, lam)]
        fast = [f + eta1 * torch.clamp(di, -clip, clip) for f, di in zip(fast, d)]
        metas.append(F.cross_entropy(functional_call(net, dict(zip(names, fast)), (meta[0],)), meta[1]))
    out = torch.autograd.grad(torch.stack(metas).mean(), list(params) + lam)
    return out[:len(params)], out[len(params):]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--basis", type=int, nargs=3, default=[200, 80, 80], help="basis vectors per layer")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = mlp(784)
    params = list(net.parameters())
    mem = GPMMemory(net)
    for j, (k, d) in enumerate(zip(a.basis, mem.dims())):
        mem.bases[j] = torch.linalg.qr(torch.randn(d, k, generator=gen)).Q.contiguous()
    lam = [torch.rand(k, generator=gen) * 0.1 + 0.9 for k in a.basis]
    x, y = torch.rand(10, 784, generator=gen), torch.randint(0, 10, (10,), generator=gen)
    rx, ry = torch.rand(10, 784, generator=gen), torch.randint(0, 10, (10,), generator=gen)
    chunks, meta = [(x[:5], y[:5]), (x[5:], y[5:])], (torch.cat([x, rx]), torch.cat([y, ry]))
    backups = [torch.empty_like(q) for q in params]

    def ours():
        return fs_step(net, params, F.cross_entropy, chunks, meta, eta1=0.05, clip=2.0, memory=mem, lambdas=lam,
                       lambda_grad=True, backups=backups)

    def ref():
        return straightforward(net, params, mem, lam, chunks, meta, 0.05, 2.0)

    r1, (g2, l2) = ours(), ref()
    err = max(float((u - v).norm() / v.norm()) for u, v in zip(list(r1.grads) + list(r1.lambda_grads),
                                                                list(g2) + list(l2)))
    times = {"awpfast_fs_step": [], "straightforward": []}
    for _ in range(a.reps):  # interleaved, so load changes hit both alike
        for name, fn in (("awpfast_fs_step", ours), ("straightforward", ref)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    res = {"median_ms": med, "ratio_straightforward_over_awpfast": med["straightforward"] / med["awpfast_fs_step"],
           "max_rel_err": err, "threads": a.threads, "reps": a.reps, "basis": a.basis, "torch": torch.__version__,
           "note": "CPU, shared and loaded machine; interleaved repetitions, medians"}
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
