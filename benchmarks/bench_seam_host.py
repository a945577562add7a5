#!/usr/bin/env python
"""Host time of one seam call: the public ``awpfast.ops`` function against the backend's group
function it ends in.

The seam's public functions validate their arguments, split the tensors into (device, dtype)
groups and call a backend's group function per group; that work is Python on the host, paid on
every call whatever the tensors' size. This benchmark measures it on lists of ``--tensors``
tensors of ``--numel`` elements each (defaults: 56 tensors, PreActResNet-18's count, of 8
elements, so that on the CPU the kernels' own work is small next to the host's):

* ``public_us``: one call of ``awpfast.ops.<op>(..., backend=B)``;
* ``group_us``: one call of backend B's group function with the same (already valid) arguments;
* ``seam_us = public_us - group_us``: validation, grouping and dispatch.

Each figure is the best of ``--number`` calls per round (the public and the group call
alternate), the median over ``--rounds`` interleaved rounds (every case once per round); on CUDA no synchronize is issued,
so the figures are host issue time, not kernel time. The load average is recorded at the start
and the end. Prints a table; ``--json PATH`` writes it.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import awpfast.ops as ops  # noqa: E402
from _bench_io import cpu_name, load_lines, rows_verdict, target, write_json  # noqa: E402

OPS = ("restore_", "perturb_", "add_scaled_", "norms", "pgd_step_")


def _cases(n, numel, device):
    """{op: (public call, group call)} for a backend ``b`` (the calls take it as their argument)."""
    g = torch.Generator().manual_seed(0)
    mk = lambda: [torch.randn(numel, generator=g).to(device) for _ in range(n)]  # noqa: E731
    P, D, B = mk(), mk(), mk()
    sc = torch.rand(n, dtype=torch.float64, generator=g).to(device)
    x = torch.rand(4, 3, 4, 4, generator=g).to(device)
    grad, xa = torch.randn(x.shape, generator=g).to(device), x.clone()
    gammas = [0.01] * n
    return {
        "restore_": (lambda b: ops.restore_(P, B, backend=b), lambda m: m.restore_(P, B)),
        "perturb_": (lambda b: ops.perturb_(P, D, 0.01, backups=B, backend=b),
                     lambda m: m.perturb_(P, D, gammas, 1e-20, B, None)),
        "add_scaled_": (lambda b: ops.add_scaled_(P, D, sc, base=B, backend=b),
                        lambda m: m.add_scaled_(P, D, sc, None, B, None, None)),
        "norms": (lambda b: ops.norms(P, backend=b), lambda m: m.norms(P)),
        "pgd_step_": (lambda b: ops.pgd_step_(xa, grad, x, 0.01, 0.03, backend=b),
                      lambda m: m.pgd_step_(xa, grad, x, 0.01, 0.03, "Linf")),
    }


def _backends(device, names=None):
    out = []
    for b in names or ops.BACKENDS:
        if b == "reference" and not names:
            continue  # the per-tensor oracle: not a backend anyone trains with
        mod, ok, why = ops._import(b)
        if not ok or not mod.supports(device, torch.float32):
            continue
        if b == "triton" and device.type == "cpu":
            continue  # the Triton interpreter: its time is not the host time of a GPU launch
        out.append((b, mod))
    return out


def run(device, n, numel, rounds, number, backends=None, op_names=OPS):
    cases = _cases(n, numel, device)
    mods = _backends(device, backends)
    keys = [(b, op, kind) for b, _ in mods for op in op_names for kind in ("public", "group")]
    times = {k: [] for k in keys}
    for b, mod in mods:  # warm-up: first calls import, build tables, compile nothing
        for op in op_names:
            cases[op][0](b)
            cases[op][1](mod)
    for _ in range(rounds):
        for b, mod in mods:
            for op in op_names:
                pub, grp = cases[op]
                best_pub = best_grp = float("inf")
                for _ in range(number):  # the two calls alternate, so both see the same machine
                    t0 = time.perf_counter()
                    pub(b)
                    t1 = time.perf_counter()
                    grp(mod)
                    t2 = time.perf_counter()
                    best_pub, best_grp = min(best_pub, t1 - t0), min(best_grp, t2 - t1)
                times[(b, op, "public")].append(best_pub * 1e6)
                times[(b, op, "group")].append(best_grp * 1e6)
    rows = []
    for b, _ in mods:
        for op in op_names:
            pub = statistics.median(times[(b, op, "public")])
            grp = statistics.median(times[(b, op, "group")])
            rows.append(dict(backend=b, op=op, tensors=1 if op == "pgd_step_" else n, public_us=pub, group_us=grp,
                             seam_us=pub - grp, public_rounds=times[(b, op, "public")],
                             group_rounds=times[(b, op, "group")]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tensors", type=int, default=56, help="tensors per list (PreActResNet-18 has 56)")
    ap.add_argument("--numel", type=int, default=8, help="elements per tensor")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds (the median is reported)")
    ap.add_argument("--number", type=int, default=200, help="calls per case and round (the best is kept)")
    ap.add_argument("--backends", default=None, help="comma list (default: every available one but reference)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    if a.tensors < 1 or a.numel < 1 or a.rounds < 1 or a.number < 1:
        ap.error("--tensors, --numel, --rounds and --number must be >= 1")
    torch.set_num_threads(a.threads)
    meta = dict(benchmark="seam_host", device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                cpu=cpu_name(), torch=torch.__version__, threads=a.threads, tensors=a.tensors, numel=a.numel,
                rounds=a.rounds, number=a.number, load_start=list(os.getloadavg()))
    rows = run(dev, a.tensors, a.numel, a.rounds, a.number, a.backends.split(",") if a.backends else None)
    data = dict(meta, rows=rows, load_end=list(os.getloadavg()), complete=True)
    if a.json:
        write_json(a.json, data, indent=1)
    print("\n".join(summary_lines(data)))
    return data


# --------------------------------------------------------------------------- the results, read here only
def verdict(data):
    """``(ok, rows not ok)`` for gpu_check: every (backend, op) timed, with finite positive times."""
    def bad(r):
        return not all(isinstance(r.get(k), float) and math.isfinite(r[k]) and r[k] > 0 for k in ("public_us", "group_us"))
    return rows_verdict(data, bad, ("backend", "op", "public_us", "group_us"), complete_default=False)


def summary_lines(data):
    """One line per (backend, op): public, group and seam host time in microseconds."""
    if not data.get("rows"):
        return []
    out = [f"  seam host time, {data['tensors']} tensors of {data['numel']} elements ({data.get('device')}, "
           f"{data.get('threads')} thread(s), median of {data['rounds']} rounds): us public / group / seam"]
    for r in data["rows"]:
        out.append(f"    {r['backend']:8s} {r['op']:12s} {r['public_us']:8.1f} {r['group_us']:8.1f} "
                   f"{r['seam_us']:8.1f}")
    return out + load_lines(data, "load_start", "load_end")


def targets(data):
    """Reported, no goal: the seam's own host time (public minus group) per list op and backend, in
    microseconds per tensor of the list."""
    out = {}
    for r in data.get("rows", []):
        if r["op"] != "pgd_step_":
            out[f"seam_host_{r['backend']}_{r['op']}_us_per_tensor"] = target(
                r["seam_us"] / max(1, r["tensors"]), "reported", None)
    return out


if __name__ == "__main__":
    main()
