#!/usr/bin/env python
"""Weight-side AWP work: the reference-style eager path against every awpfast backend.

Times one perturb + restore of all selected weights (conv/linear) of PreActResNet-18 and
WideResNet-34-10, excluding the forward/backward passes (the ascent gradients are given):

* ``reference-eager``: the reference pattern written from the design brief: state-dict copy
  into a proxy model, a proxy SGD step with the ascent gradient, per-layer diff and scale,
  add into the model, subtract after the step.
* ``foreach-simple``: the straightforward ``torch._foreach_*`` version the design brief quotes
  (scaled direction as a temporary, then add), for reference.
* one row per awpfast backend: ``perturb_`` (norms, scale on device, apply + backup) and
  ``restore_`` (copy back), called once per (device, dtype) group.

The bytes floor is 8 * N * b (design brief section 3) at the copy bandwidth measured in the
same run (a large tensor copy; bytes read + written). Prints a table; ``--json PATH`` writes it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import awpfast.ops as ops  # noqa: E402
from awpfast.models import PreActResNet18, WideResNet  # noqa: E402
from awpfast.perturb import select_parameters  # noqa: E402

MODELS = {"preact18": lambda: PreActResNet18(), "wrn34-10": lambda: WideResNet(34, 10)}
GAMMA, EPS = 0.01, 1e-20


# --------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn, reps: int, warmup: int = 2) -> tuple:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), min(times), max(times)


def copy_bandwidth_gbs(device, timer, nbytes=256 << 20, reps=10):
    """Read+write bandwidth of a large tensor copy (GB/s, 1e9 bytes)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    med, _, _ = timer.median_ms(lambda: dst.copy_(src), reps)
    return 2 * nbytes / (med * 1e-3) / 1e9


# --------------------------------------------------------------------------- cases
class Case:
    """One model's selected weights and ascent gradients (several rotating copies on GPU)."""

    def __init__(self, name, device, dtype, copies):
        torch.manual_seed(0)
        self.sets = []
        for _ in range(copies):
            model = MODELS[name]().to(device=device, dtype=dtype)
            sel = select_parameters(model)
            params = [p.data for _, p in sel]
            grads = [torch.randn_like(p) * 1e-3 for p in params]
            self.sets.append({"model": model, "names": [n for n, _ in sel], "params": params, "grads": grads,
                              "backups": [torch.empty_like(p) for p in params], "proxy": None})
        self.n = sum(p.numel() for p in self.sets[0]["params"])
        self.layers = len(self.sets[0]["params"])
        self.elem = self.sets[0]["params"][0].element_size()
        self.i = 0

    def next(self):
        s = self.sets[self.i % len(self.sets)]
        self.i += 1
        return s


def reference_eager(s):
    """The reference pattern (brief section 1), weight side only."""
    model = s["model"]
    if s["proxy"] is None:
        s["proxy"] = copy.deepcopy(model)
        s["proxy_opt"] = torch.optim.SGD(s["proxy"].parameters(), lr=0.01)
        s["proxy_sel"] = dict(select_parameters(s["proxy"]))
    proxy, popt = s["proxy"], s["proxy_opt"]
    proxy.load_state_dict(model.state_dict())                        # state-dict copy into the proxy
    for n, g in zip(s["names"], s["grads"]):
        s["proxy_sel"][n].grad = -g                                   # ascent: gradient of -loss
    popt.step()                                                       # plain SGD step
    old, new = model.state_dict(), proxy.state_dict()
    diff = {}
    for k in s["names"]:                                              # per-layer diff and scale
        d = new[k] - old[k]
        diff[k] = old[k].norm() / (d.norm() + EPS) * d
    with torch.no_grad():
        for n, p in model.named_parameters():                         # perturb
            if n in diff:
                p.add_(GAMMA * diff[n])
        for n, p in model.named_parameters():                         # restore (after the step)
            if n in diff:
                p.add_(-GAMMA * diff[n])


def foreach_simple(s):
    """The brief's "straightforward torch._foreach_* version": norms, backup copy, the scaled
    direction as a temporary, add; restore by copy. The baseline of the foreach targets."""
    ps, gs, bs = s["params"], s["grads"], s["backups"]
    wn = torch.stack(torch._foreach_norm(ps))
    gn = torch.stack(torch._foreach_norm(gs))
    torch._foreach_copy_(bs, ps)
    scale = GAMMA * wn / (gn + EPS)
    torch._foreach_add_(ps, torch._foreach_mul(gs, list(scale.unbind(0))))
    torch._foreach_copy_(ps, bs)


def awpfast_backend(name):
    def run(s):
        be = ops.get_backend(name, s["params"][0].device, s["params"][0].dtype)
        be.perturb_(s["params"], s["grads"], [GAMMA] * len(s["params"]), EPS, s["backups"], None)
        be.restore_(s["params"], s["backups"])
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float32", help="comma list: float32,bfloat16")
    ap.add_argument("--models", default="preact18,wrn34-10")
    ap.add_argument("--backends", default=None, help="comma list (default: every available one for the device)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7 on CPU, 50 on CUDA)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    timer = Timer(device)
    reps = args.reps or (50 if device.type == "cuda" else 7)
    copies = 3 if device.type == "cuda" else 1
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = [b for b in ops.available_backends() if b != "reference"
                    and ops._import(b)[0].supports_device(device)]
    bw = copy_bandwidth_gbs(device, timer)
    rows = []
    for model_name in args.models.split(","):
        for dt_name in args.dtypes.split(","):
            dtype = getattr(torch, dt_name)
            case = Case(model_name, device, dtype, copies)
            floor_ms = 8 * case.n * case.elem / (bw * 1e9) * 1e3
            variants = [("reference-eager", reference_eager), ("foreach-simple", foreach_simple)]
            variants += [(b, awpfast_backend(b)) for b in backends]
            base = None
            for vname, fn in variants:
                try:
                    med, lo, hi = timer.median_ms(lambda: fn(case.next()), reps)
                except Exception as e:  # a backend that cannot run here is reported, not fatal
                    rows.append({"model": model_name, "dtype": dt_name, "variant": vname, "error": repr(e)})
                    continue
                if vname == "reference-eager":
                    base = med
                rows.append({"model": model_name, "dtype": dt_name, "variant": vname, "median_ms": med,
                             "min_ms": lo, "max_ms": hi, "elements": case.n, "layers": case.layers,
                             "floor_ms": floor_ms, "x_floor": med / floor_ms,
                             "speedup_vs_reference": (base / med) if base else None})
            case = None  # free this model set before the next one
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "device_type": device.type, "threads": torch.get_num_threads() if device.type == "cpu" else None,
           "torch": torch.__version__, "copy_bandwidth_gbs": bw, "reps": reps, "rows": rows}
    print(f"\nweight-side perturb+restore on {out['device']} ({device.type}); copy bandwidth {bw:.1f} GB/s "
          f"(read+write); median of {reps}")
    print(f"{'model':9s} {'dtype':9s} {'variant':16s} {'median ms':>10s} {'x floor':>8s} {'vs eager':>9s} {'vs foreach':>10s}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:9s} {r['dtype']:9s} {r['variant']:16s}  error: {r['error'][:60]}")
            continue
        fe = next((q for q in rows if q["model"] == r["model"] and q["dtype"] == r["dtype"]
                   and q["variant"] == "foreach" and "median_ms" in q), None)
        r["speedup_vs_foreach"] = fe["median_ms"] / r["median_ms"] if fe else None
        print(f"{r['model']:9s} {r['dtype']:9s} {r['variant']:16s} {r['median_ms']:10.3f} {r['x_floor']:8.2f} "
              f"{(r['speedup_vs_reference'] or 0):8.2f}x {(r['speedup_vs_foreach'] or 0):9.2f}x")
    print(f"(floor = 8*N*bytes / copy bandwidth; WRN-34-10 N = "
          f"{next((r['elements'] for r in rows if r['model'] == 'wrn34-10' and 'elements' in r), 0):,})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
