"""Time one update per incoming batch of every continual learner, and the parts of the FS step,
in one run, interleaved (every repetition runs every item once, so load changes hit all alike).

    python benchmarks/bench_continual.py [--json PATH] [--threads 1] [--reps 100] [--device cpu]

Model: the PMNIST MLP 784-100-100-10 (bias-free), batch 10 (+10 replayed), GPM bases of
200/80/80 vectors, soft weights in (0.9, 1). Items (median ms per call):

* ``sgd_update`` / ``gpm_update`` / ``fs_er_update`` / ``fs_dgpm_update``: one
  ``ContinualLearner._update`` (what each of the 5 glances per batch costs): gradient(s),
  clip, soft-weight step (DGPM), projection, optimizer step.
* ``fs_step_<backend>``: the FS step alone (2 inner chunks: 2 gradients, 2 perturbations, 2
  meta gradients, restore, closed-form soft-weight gradient) with the seam's perturb/restore
  ops on each backend; ``fs_step_straightforward``: a functional fast-weights version with
  autograd through the soft weights (what the official code does), same results.
* ``soft_projection``: ``project_out_`` with soft weights on the 3 gradients (once per update).
* ``perturb_restore_seam_<backend>`` vs ``perturb_restore_plain``: the weight-side part of
  the FS step (2 clipped, scaled adds with backup, then restore) through ``ops.add_scaled_``
  / ``ops.restore_`` against a plain PyTorch loop.

``os.getloadavg()`` is recorded before and after (the CPU may be shared).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from awpfast import ops
from awpfast.continual import Config, ContinualLearner, GPMMemory, fs_step, mlp


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


def _bases(gen, sizes, dims, device):
    return [torch.linalg.qr(torch.randn(d, k, generator=gen)).Q.contiguous().to(device) for k, d in zip(sizes, dims)]


def _learner(method, bases, gen, device, x, y):
    torch.manual_seed(0)
    net = mlp(784).to(device)
    lr = ContinualLearner(net, Config(method=method), gen)
    if lr.memory is not None:
        lr.memory.bases = [b.clone() for b in bases]
    if lr.replay.capacity:
        for _ in range(20):
            lr.replay.add(torch.rand(10, 784, generator=gen).to(device), torch.randint(0, 10, (10,), generator=gen)
                          .to(device))
    lr.begin_task(1)
    if lr.theta is not None:  # soft weights away from the sigmoid's flat top, as after some learning
        for th in lr.theta:
            th.fill_(0.25)
    return lambda: lr._update(x, y)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--basis", type=int, nargs=3, default=[200, 80, 80], help="basis vectors per layer")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    load_before = os.getloadavg()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = mlp(784).to(dev)
    params = list(net.parameters())
    mem = GPMMemory(net)
    mem.bases = _bases(gen, a.basis, mem.dims(), dev)
    lam = [(torch.rand(k, generator=gen) * 0.1 + 0.9).to(dev) for k in a.basis]
    x, y = torch.rand(10, 784, generator=gen).to(dev), torch.randint(0, 10, (10,), generator=gen).to(dev)
    rx, ry = torch.rand(10, 784, generator=gen).to(dev), torch.randint(0, 10, (10,), generator=gen).to(dev)
    chunks, meta = [(x[:5], y[:5]), (x[5:], y[5:])], (torch.cat([x, rx]), torch.cat([y, ry]))
    backups = [torch.empty_like(q) for q in params]
    grads = [torch.randn_like(q) for q in params]
    dirs = [torch.randn_like(q) for q in params]
    backends = [b for b in ops.available_backends() if b != "triton" or dev.type == "cuda"]

    def fs(backend):
        return lambda: fs_step(net, params, F.cross_entropy, chunks, meta, eta1=0.05, clip=2.0, memory=mem,
                               lambdas=lam, lambda_grad=True, backups=backups, backend=backend)

    def seam(backend):
        @torch.no_grad()
        def run():
            for k in range(2):
                ops.add_scaled_(params, dirs, 0.05, clip=2.0, backups=backups if k == 0 else None, backend=backend)
            ops.restore_(params, backups, backend=backend)
        return run

    @torch.no_grad()
    def plain():
        for k in range(2):
            for q, d, b in zip(params, dirs, backups):
                if k == 0:
                    b.copy_(q)
                q.add_(d.clamp(-2.0, 2.0), alpha=0.05)
        for q, b in zip(params, backups):
            q.copy_(b)

    def proj():
        mem.project_out_([g.clone() for g in grads], lam)

    def clone_only():
        [g.clone() for g in grads]

    ref_fs = fs(None)()
    g2, l2 = straightforward(net, params, mem, lam, chunks, meta, 0.05, 2.0)
    err = max(float((u - v).norm() / v.norm()) for u, v in zip(list(ref_fs.grads) + list(ref_fs.lambda_grads),
                                                                list(g2) + list(l2)))
    items = {m.replace("-", "_") + "_update": _learner(m, mem.bases, gen, dev, x, y)
             for m in ("sgd", "gpm", "fs-er", "fs-dgpm")}
    items.update({f"fs_step_{b}": fs(b) for b in backends})
    items["fs_step_straightforward"] = lambda: straightforward(net, params, mem, lam, chunks, meta, 0.05, 2.0)
    items["soft_projection"] = proj
    items["soft_projection_clone_overhead"] = clone_only
    items.update({f"perturb_restore_seam_{b}": seam(b) for b in backends})
    items["perturb_restore_plain"] = plain
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    for fn in items.values():  # warm-up
        fn()
    times = {k: [] for k in items}
    for _ in range(a.reps):
        for name, fn in items.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    sgd = med["sgd_update"]
    res = {"median_ms": med, "over_sgd_update": {k: v / sgd for k, v in med.items()},
           "fs_step_max_rel_err_vs_straightforward": err, "backends": backends, "device": str(dev),
           "threads": a.threads, "reps": a.reps, "basis": a.basis, "torch": torch.__version__,
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpu_count": os.cpu_count(),
           "note": "medians of interleaved repetitions; one update = one of the 5 glances per incoming batch"}
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


# --------------------------------------------------------------------------- the results, read here only
def summary_lines(data):
    """Text lines of the JSON ``main`` writes: per item the median ms per call and its ratio to one
    SGD update, the FS step's error against the straightforward version, the load average before
    and after (1 / 5 / 15 min)."""
    med = data.get("median_ms") or {}
    if not med:
        return []
    over = data.get("over_sgd_update") or {}
    out = [f"  continual learners on {data.get('device')}, {data.get('threads')} thread(s): median ms per call "
           f"over {data.get('reps')} interleaved repetitions, x one SGD update"]
    for k, v in med.items():
        out.append(f"    {k:32s} {v:10.3f} ms {over.get(k, float('nan')):8.2f}x")
    if "fs_step_max_rel_err_vs_straightforward" in data:
        out.append(f"    FS step max relative error against the straightforward version: "
                   f"{data['fs_step_max_rel_err_vs_straightforward']:.1e}")
    from _bench_io import load_text
    out.append(f"    load average before {load_text(data.get('loadavg_before'))}, after "
               f"{load_text(data.get('loadavg_after'))} ({data.get('cpu_count')} CPUs)")
    return out


def targets(data):
    """None: relative CPU costs of the continual learners, with no stated goal to meet."""
    return {}


if __name__ == "__main__":
    sys.exit(main())
