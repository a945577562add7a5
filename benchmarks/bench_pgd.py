#!/usr/bin/env python
"""One PGD step (L-inf and L2) on a CIFAR batch: the eager sequence vs every awpfast backend.

The eager sequence is the usual attack code (sign / per-sample normalized step, projection
onto the eps-ball, box clamp: 6 to 12 small kernels). Each awpfast backend runs
``awpfast.ops.pgd_step_`` (the triton backend: one fused launch for either norm).

Inputs rotate over enough (x_adv, grad, x) sets to exceed the GPU's L2 cache, so cached
re-reads do not flatter the numbers. GPU timing: CUDA events around ``--inner`` calls,
median over ``--reps`` samples. The bytes floor is 4 * N * b per step (read x_adv, grad, x;
write x_adv). On CUDA the kernels launched per step are counted with the profiler, and
each row has three timings: ``median_us`` (``--inner`` calls back to back per event pair:
the GPU queue stays full), ``single_us`` (one call per event pair after a synchronize:
launch included, what one isolated step costs) and ``graph_us`` (CUDA-graph replay: kernel
time alone); ``launch_us`` = single - graph. Every row is first checked against the float64
reference on the benchmark's own tensors (``err``, ``verified_ok``).

Prints a table; ``--json PATH`` writes the results.
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
import awpfast.ops as ops  # noqa: E402
from _bench_io import rows_verdict, target, write_json  # noqa: E402


# --------------------------------------------------------------------------- eager sequences
def eager_linf(x_adv, grad, x, alpha, eps):
    adv = x_adv + alpha * grad.sign()
    delta = torch.clamp(adv - x, min=-eps, max=eps)
    x_adv.copy_(torch.clamp(x + delta, min=0, max=1))


def eager_l2(x_adv, grad, x, alpha, eps):
    b = x.shape[0]
    view = (-1,) + (1,) * (x.dim() - 1)
    gn = torch.norm(grad.reshape(b, -1), p=2, dim=1) + 1e-10
    adv = x_adv + alpha * grad / gn.view(view)
    delta = adv - x
    dn = torch.norm(delta.reshape(b, -1), p=2, dim=1)
    factor = torch.min(eps / dn, torch.ones_like(dn))
    x_adv.copy_(torch.clamp(x + delta * factor.view(view), min=0, max=1))


PARAMS = {"Linf": (2 / 255, 8 / 255), "L2": (0.1, 0.5)}


def _impl(name, norm):
    alpha, eps = PARAMS[norm]
    if name == "eager":
        f = eager_linf if norm == "Linf" else eager_l2
        return lambda xa, g, x: f(xa, g, x, alpha, eps)
    return lambda xa, g, x: ops.pgd_step_(xa, g, x, alpha, eps, norm, backend=name)


# --------------------------------------------------------------------------- timing
def _time(fn, sets, device, reps, inner):
    cuda = device.type == "cuda"
    k = [0]

    def call():
        xa, g, x = sets[k[0] % len(sets)]
        k[0] += 1
        fn(xa, g, x)

    for _ in range(3):
        call()
    if cuda:
        torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                call()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b) * 1e3 / inner)
        else:
            t = time.perf_counter()
            for _ in range(inner):
                call()
            samples.append((time.perf_counter() - t) * 1e6 / inner)
    return statistics.median(samples), samples


def _time_single(fn, sets, reps):
    """CUDA: median us of ONE call per event pair after a synchronize (launch included)."""
    samples = []
    for i in range(reps):
        xa, g, x = sets[i % len(sets)]
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(xa, g, x)
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) * 1e3)
    return statistics.median(samples)


def _time_graph(fn, sets, reps):
    """CUDA: median us per call replaying one CUDA graph per input set (no launch overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for xa, g, x in sets[:2]:
            fn(xa, g, x)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graphs = []
    for xa, g, x in sets:
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            fn(xa, g, x)
        graphs.append(gr)
    samples = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for gr in graphs:
            gr.replay()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) * 1e3 / len(graphs))
    return statistics.median(samples)


def _verify(fn, sets, norm):
    """Relative error of one step against the float64 reference on the benchmark's tensors,
    and whether the result stays in the box and the eps-ball."""
    alpha, eps = PARAMS[norm]
    xa, g, x = sets[0]
    out = xa.clone()
    fn(out, g, x)
    ref = xa.double().cpu().clone()
    ops.pgd_step_(ref, g.double().cpu(), x.double().cpu(), alpha, eps, norm, backend="reference")
    o = out.double().cpu()
    err = float((o - ref).norm() / ref.norm()) if torch.isfinite(o).all() else float("inf")
    d = (o - x.double().cpu()).reshape(o.shape[0], -1)
    size = float(d.abs().max()) if norm == "Linf" else float(d.norm(dim=1).max())
    lim = 1e-6 if out.dtype == torch.float32 else 2e-2
    ok = err < lim and float(o.min()) >= 0 and float(o.max()) <= 1 and size <= eps * (1 + 1e-3) + 1e-2 * (lim > 1e-6)
    return {"err": err, "verified_ok": bool(ok)}


def _count_kernels(fn, sets):
    """Kernels launched by one call (CUDA profiler); None when the profiler is unavailable."""
    try:
        from torch.profiler import ProfilerActivity, profile
        xa, g, x = sets[0]
        fn(xa, g, x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(xa, g, x)
            torch.cuda.synchronize()
        n = 0
        for e in prof.events():
            dt = getattr(e, "device_type", None)
            if dt is not None and "CUDA" in str(dt) and "memcpy" not in e.name.lower() \
                    and "memset" not in e.name.lower():
                n += 1
        return n
    except Exception:  # pragma: no cover - profiler differences between torch versions
        return None


def _backend_usable(name, device):
    if name not in ops.available_backends():
        return False, "not available"
    mod = ops.get_backend(name, device, torch.float32)
    if not mod.__name__.endswith(name):
        return False, "does not support this device (falls back)"
    if name == "triton" and device.type != "cuda":
        return False, "Triton on the CPU is the interpreter: not a timing"
    return True, ""


def run(device, dtypes, batch, shape, reps, inner, backends=None, on_row=None, graph=True):
    device = torch.device(device)
    names = ["eager"] + [b for b in (backends or ["foreach", "triton", "native"])]
    rows, skipped = [], {}
    cuda = device.type == "cuda"
    for dtn in dtypes:
        dtype = getattr(torch, dtn)
        numel = batch * shape[0] * shape[1] * shape[2]
        bytes_step = 4 * numel * torch.empty((), dtype=dtype).element_size()
        nsets = 16 if cuda else 2
        if cuda:  # enough sets to exceed L2 (~50 MB on an H100)
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20)
            nsets = max(4, min(64, int(3 * l2 // bytes_step) + 1))
        g = torch.Generator(device="cpu").manual_seed(0)
        sets = []
        for _ in range(nsets):
            x = torch.rand((batch,) + tuple(shape), generator=g).to(device=device, dtype=dtype)
            xa = (x.float() + (torch.rand(x.shape, generator=g).to(device) * 2 - 1) * 8 / 255).clamp(0, 1).to(dtype)
            gr = torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)
            sets.append((xa, gr, x))
        for norm in ("Linf", "L2"):
            base = None
            for name in names:
                if name != "eager":
                    ok, why = _backend_usable(name, device)
                    if not ok:
                        skipped[name] = why
                        continue
                fn = _impl(name, norm)
                row = {"norm": norm, "dtype": dtn, "impl": name}
                try:
                    row.update(_verify(fn, sets, norm))
                    med, samples = _time(fn, sets, device, reps, inner)
                    row.update(median_us=med, min_us=min(samples), GBps=bytes_step / (med * 1e-6) / 1e9)
                    if cuda:
                        row["single_us"] = _time_single(fn, sets, reps)
                        if graph:
                            try:
                                row["graph_us"] = _time_graph(fn, sets, max(5, reps // 3))
                            except Exception as e:  # pragma: no cover - depends on the GPU stack
                                row["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                                torch.cuda.synchronize()
                        row["kernels"] = _count_kernels(fn, sets)
                        row["launch_us"] = row["single_us"] - row.get("graph_us", med)
                    else:
                        row["kernels"] = None
                except Exception as e:  # a backend failing must not hide the others
                    skipped[f"{name}/{norm}/{dtn}"] = f"{type(e).__name__}: {e}"
                    continue
                if name == "eager":
                    base = row
                for key, src in (("speedup_vs_eager", "median_us"), ("speedup_vs_eager_single", "single_us"),
                                 ("speedup_vs_eager_graph", "graph_us")):
                    row[key] = (base[src] / row[src]) if base and src in base and src in row else None
                rows.append(row)
                if on_row:
                    on_row(rows, skipped)
    return rows, skipped


def print_table(rows, skipped=None, file=sys.stdout):
    hdr = (f"{'norm':5} {'dtype':9} {'impl':8} {'loop us':>9} {'single':>8} {'graph':>8} {'vs eager':>9} "
           f"{'GB/s':>8} {'kernels':>8} {'err':>8}")
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    nan = float("nan")
    for r in rows:
        sp = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "-"
        k = "-" if r.get("kernels") is None else str(r["kernels"])
        print(f"{r['norm']:5} {r['dtype']:9} {r['impl']:8} {r['median_us']:9.1f} {r.get('single_us', nan):8.1f} "
              f"{r.get('graph_us', nan):8.1f} {sp:>9} {r['GBps']:8.1f} {k:>8} {r.get('err', nan):8.1e}", file=file)
    for k, v in (skipped or {}).items():
        print(f"  skipped {k}: {v}", file=file)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float32", help="comma list: float32,bfloat16,float16")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--shape", default="3,32,32", help="C,H,W of one sample")
    ap.add_argument("--backends", default=None, help="comma list (default foreach,triton,native)")
    ap.add_argument("--reps", type=int, default=None, help="timed samples (default 50 on CUDA, 5 on CPU)")
    ap.add_argument("--inner", type=int, default=None, help="calls per sample (default 20 on CUDA, 3 on CPU)")
    ap.add_argument("--no-graph", action="store_true", help="CUDA: skip the CUDA-graph replay timing")
    ap.add_argument("--json", default=None, help="write the results here (rewritten after every row)")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    reps = a.reps or (50 if dev.type == "cuda" else 5)
    inner = a.inner or (20 if dev.type == "cuda" else 3)
    shape = tuple(int(s) for s in a.shape.split(","))
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "batch": a.batch, "shape": shape, "reps": reps, "inner": inner}

    def save(rows, skipped, complete=False):
        if a.json:
            write_json(a.json, dict(meta, rows=rows, skipped=skipped, complete=complete), announce=False, indent=1)

    rows, skipped = run(dev, a.dtypes.split(","), a.batch, shape, reps, inner,
                        a.backends.split(",") if a.backends else None, on_row=save, graph=not a.no_graph)
    save(rows, skipped, complete=True)
    print(f"PGD step, batch {a.batch}x{'x'.join(map(str, shape))}, device "
          f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.processor() or 'cpu'}")
    print_table(rows, skipped)
    return rows


# --------------------------------------------------------------------------- the results, read here only
def verdict(data):
    """``(ok, rows not ok)``: every row timed without an error and verified, the run complete."""
    return rows_verdict(data, lambda r: "error" in r or r.get("verified_ok") is False,
                        ("norm", "dtype", "impl", "error", "err"), present_only=True)


def summary_lines(data):
    """gpu_check's text lines: one per row (loop / single / graph us, against eager, kernels, error)."""
    if not data.get("rows"):
        return []
    out = ["  PGD step (batch %s): us loop / single / graph, vs eager, kernels, err" % data.get("batch")]
    nan = float("nan")
    for r in data["rows"]:
        out.append(f"    {r['norm']:5s} {r['dtype']:9s} {r['impl']:8s} {r['median_us']:8.1f} "
                   f"{r.get('single_us', nan):8.1f} {r.get('graph_us', nan):8.1f} "
                   f"{(r.get('speedup_vs_eager') or 0):6.2f}x {str(r.get('kernels')):>4s} {r.get('err', nan):8.1e}")
    return out


def targets(data):
    """The GPU targets of the fp32 L-inf step per fused implementation: one kernel launch and >= 3x
    the eager sequence."""
    out = {}
    prow = [r for r in data.get("rows", []) if r.get("norm") == "Linf" and r.get("dtype") == "float32"]
    eager = next((r for r in prow if r["impl"] == "eager"), None)
    for r in prow:
        if r["impl"] == "eager":
            continue
        key = f"pgd_linf_{r['impl']}"
        if r.get("kernels") is not None:
            out[key + "_launches"] = target(r["kernels"], "== 1", r["kernels"] == 1)
        sp = r.get("speedup_vs_eager")
        if sp is not None:
            note = None
            if "graph_us" in r:
                note = (f"kernel {r['graph_us']:.1f} us (graph replay), launch {r.get('launch_us', 0):.1f} us; "
                        f"eager kernel {(eager or {}).get('graph_us', float('nan')):.1f} us")
            out[key + "_vs_eager"] = target(sp, ">= 3", sp >= 3, note=note)
    return out


if __name__ == "__main__":
    main()
