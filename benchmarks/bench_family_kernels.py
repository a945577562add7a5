#!/usr/bin/env python
"""The family seam ops on their own, per backend: the fused kernels against foreach.

Times, on the WRN-34-10 parameter set (``awpfast.models.WideResNet(34, 10)``, gradients
``randn * 1e-3`` as directions), one call sequence per row:

* ``add_scaled+restore``: ``add_scaled_(params, grads, scale, backups=...)`` with a per-tensor
  scale tensor on the device, then ``restore_``;
* ``sam``: ``global_sqnorm(grads)``, ``add_scaled_`` with ``rho / (sqrt(n) + 1e-12)`` (a 0-dim
  device tensor: no host sync), ``restore_``;
* ``asam``: ``global_sqnorm(grads, weights=params, eta)``, ``asam_apply_``, ``restore_``;
* ``box``: ``box_perturb_(first=True)`` on the parameters named ``*weight*`` (BoxAWP's
  default selection), ``restore_`` from the origins.

Each row also records the result's error against the float64 ``reference`` backend on the
same inputs (so a fast wrong kernel cannot hide) and the bytes floor at the copy bandwidth
measured in the same run (add_scaled 6, SAM 7, ASAM and Box 8 passes of N elements).
Prints a table; writes JSON (``--json PATH``, default ``benchmarks/results/<date>_<device>_family_kernels.json``).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_io import rows_verdict, write_json  # noqa: E402
import awpfast.ops as ops  # noqa: E402
from awpfast.models import WideResNet  # noqa: E402

RHO, ETA, ADV_LR, ADV_EPS = 0.05, 0.01, 1.0, 0.2
PASSES = {"add_scaled+restore": 6, "sam": 7, "asam": 8, "box": 8}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, reps, device, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def copy_bandwidth_gbs(device, nbytes=256 << 20, reps=7):
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    med, _, _ = median_ms(lambda: dst.copy_(src), reps, device)
    return 2 * nbytes / (med * 1e-3) / 1e9


def make_case(rule, params, grads, bufs, backend):
    """A no-argument callable running one row's op sequence with ``backend``."""
    if rule == "add_scaled+restore":
        scale = torch.rand(len(params), device=params[0].device) * 1e-2

        def run():
            ops.add_scaled_(params, grads, scale, backups=bufs, backend=backend)
            ops.restore_(params, bufs, backend=backend)
    elif rule == "sam":
        def run():
            n = ops.global_sqnorm(grads, backend=backend)
            ops.add_scaled_(params, grads, RHO / (n.sqrt() + 1e-12), backups=bufs, backend=backend)
            ops.restore_(params, bufs, backend=backend)
    elif rule == "asam":
        def run():
            n = ops.global_sqnorm(grads, weights=params, eta=ETA, backend=backend)
            ops.asam_apply_(params, grads, RHO / (n.sqrt() + 1e-12), eta=ETA, backups=bufs, backend=backend)
            ops.restore_(params, bufs, backend=backend)
    else:
        def run():
            ops.box_perturb_(params, grads, ADV_LR, ADV_EPS, bufs, first=True, backend=backend)
            ops.restore_(params, bufs, backend=backend)
    return run


def perturbed(rule, params, grads, backend):
    """The perturbed weights of one row's op sequence (without the restore), on copies."""
    ps = [p.clone() for p in params]
    if rule == "add_scaled+restore":
        ops.add_scaled_(ps, grads, [1e-2 * (1 + i % 5) for i in range(len(ps))], backend=backend)
    elif rule == "sam":
        n = ops.global_sqnorm(grads, backend=backend)
        ops.add_scaled_(ps, grads, RHO / (n.sqrt() + 1e-12), backend=backend)
    elif rule == "asam":
        n = ops.global_sqnorm(grads, weights=ps, eta=ETA, backend=backend)
        ops.asam_apply_(ps, grads, RHO / (n.sqrt() + 1e-12), eta=ETA, backend=backend)
    else:
        ops.box_perturb_(ps, grads, ADV_LR, ADV_EPS, [torch.empty_like(p) for p in ps], first=True, backend=backend)
    return ps


def max_rel_err(ps, ref):
    """max over tensors of ||p - ref|| / ||ref|| (float64), inf if anything is not finite."""
    worst = 0.0
    for p, r in zip(ps, ref):
        p64 = p.double().cpu()
        if not torch.isfinite(p64).all():
            return float("inf")
        den = float(r.norm())
        worst = max(worst, float((p64 - r).norm()) / den if den > 0 else float((p64 - r).norm()))
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", default="foreach,native")
    ap.add_argument("--rules", default="add_scaled+restore,sam,asam,box")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-json", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = WideResNet(34, 10).to(device)
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    bw = copy_bandwidth_gbs(device)
    rows = []
    for rule in args.rules.split(","):
        params = [p for n, p in named if rule != "box" or "weight" in n]
        grads = [torch.randn_like(p) * 1e-3 for p in params]
        bufs = [torch.empty_like(p) for p in params]
        nel = sum(p.numel() for p in params)
        floor_ms = PASSES[rule] * nel * params[0].element_size() / (bw * 1e9) * 1e3
        ref = [t.double().cpu() for t in perturbed(rule, [p.double().cpu() for p in params],
                                                   [g.double().cpu() for g in grads], "reference")]
        base = None
        for be in args.backends.split(","):
            err = max_rel_err(perturbed(rule, params, grads, be), ref)
            med, lo, hi = median_ms(make_case(rule, params, grads, bufs, be), args.reps, device)
            base = med if base is None else base
            own = hasattr(ops.get_backend(be, device, params[0].dtype), {"add_scaled+restore": "add_scaled_", "sam":
                          "global_sqnorm", "asam": "asam_apply_", "box": "box_perturb_"}[rule])
            rows.append({"rule": rule, "backend": be, "own_kernels": own, "tensors": len(params), "elements": nel,
                         "median_ms": med, "min_ms": lo, "max_ms": hi, "floor_ms": floor_ms,
                         "x_floor": med / floor_ms, "speedup_vs_first": base / med, "max_rel_err_vs_fp64": err})
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "device_type": device.type, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "copy_bandwidth_gbs": bw, "reps": args.reps, "loadavg_at_start": load,
           "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None, "rows": rows}
    print(f"\nfamily seam ops on WRN-34-10, {out['device']} ({device.type}, {out['threads']} threads, load {load}); "
          f"copy bandwidth {bw:.1f} GB/s")
    print(f"{'rule':19s} {'backend':8s} {'tensors':>7s} {'M elem':>7s} {'median ms':>10s} {'x floor':>8s} "
          f"{'speedup':>8s} {'rel err':>9s}")
    for r in rows:
        print(f"{r['rule']:19s} {r['backend']:8s} {r['tensors']:7d} {r['elements'] / 1e6:7.1f} {r['median_ms']:10.2f} "
              f"{r['x_floor']:8.2f} {r['speedup_vs_first']:8.2f} {r['max_rel_err_vs_fp64']:9.1e}")
    print(f"(medians of {args.reps}; speedup against the first backend listed; floor = passes * N * bytes / "
          "copy bandwidth)")
    if not args.no_json:
        path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                         f"{time.strftime('%Y-%m-%d')}_{device.type}-{out['threads']}core_family_kernels.json")
        write_json(path, out)
    return out


# --------------------------------------------------------------------------- the results, read here only
def verdict(data):
    """``(ok, rows not ok)``: every row within 1e-4 of float64 (relative)."""
    return rows_verdict(data, lambda r: not (r.get("max_rel_err_vs_fp64", 1.0) < 1e-4),
                        ("rule", "backend", "max_rel_err_vs_fp64"))


def summary_lines(data):
    """gpu_check's text lines: one per (rule, backend) row."""
    if not data.get("rows"):
        return []
    out = [f"  family seam ops on WRN-34-10, ms (copy bw {data.get('copy_bandwidth_gbs', 0):.0f} GB/s): "
           "median, x floor, vs first backend, err vs float64"]
    for r in data["rows"]:
        out.append(f"    {r['rule']:19s} {r['backend']:8s} {r['median_ms']:8.3f} {r['x_floor']:6.2f}x "
                   f"{r['speedup_vs_first']:6.2f}x {r['max_rel_err_vs_fp64']:8.1e}")
    return out


def targets(data):
    """None: the family seam ops have no stated speed goal; ``verdict`` judges their error."""
    return {}


if __name__ == "__main__":
    main()
