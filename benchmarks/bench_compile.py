#!/usr/bin/env python
"""Eager against compiled: one whole AT-AWP training step (PGD attack, AWP ascent, descent,
SGD step) as docs/compile.md compiles it.

    python benchmarks/bench_compile.py --device cpu --json benchmarks/results/DATE_cpu-2core_compile.json
    python benchmarks/bench_compile.py --device cuda --models wrn34-10 --dtype bfloat16 --batch 128 \\
        --attack-steps 10 --json out.json                    # the gpu_check.py section bench_compile

Per model: the eager step (median over ``--steps`` after ``--warmup``), then the compiled step
(``torch.compile(step, mode=awpfast.compiled.compile_mode(device))``, base SGD state primed):

* ``compile_cold_s``: the first compiled call (tracing + Inductor codegen + one step), in a
  fresh Inductor cache directory (a temporary TORCHINDUCTOR_CACHE_DIR unless one is set);
* ``compile_warm_s``: the same after ``torch._dynamo.reset()``, Inductor's on-disk caches now
  filled (what a second run of the same script pays);
* steady-state step ms (median and quartiles over ``--steps``), ``graphs`` of the first call,
  graph breaks and fallbacks to eager by site, anything compiled again in steady state;
* ``os.getloadavg()`` before and after each phase (the CPU is shared: read the numbers with it).

Random starts are on (as in training); the compiled and eager steps are not compared number for
number here (tests/test_compile.py does that).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEFAULTS = {  # (batch, image size, attack steps) for a CPU run of a few minutes
    "small-cnn": (32, 28, 3),
    "preact18": (8, 32, 2),
    "wrn34-10": (128, 32, 10),
}


def _load():
    return [round(x, 2) for x in os.getloadavg()]


def _sync(dev):
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, args, n, dev):
    out = []
    for _ in range(n):
        _sync(dev)
        t0 = time.perf_counter()
        fn(*args)
        _sync(dev)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _stats(ms):
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": round(statistics.median(ms), 2), "q1_ms": round(q[0], 2), "q3_ms": round(q[2], 2),
            "n": len(ms)}


def build(name, dev, dtype, batch, size, attack_steps, seed=0):
    import torch
    import torch.nn.functional as F
    from awpfast import AWP
    from awpfast.attacks import PGD
    from awpfast.compiled import prime_base_state
    from awpfast.models import create_model
    torch.manual_seed(seed)
    in_ch = 1 if name == "small-cnn" else 3
    m = create_model(name, num_classes=10, in_channels=in_ch).to(dev, dtype).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    primed = prime_base_state(opt)
    awp = AWP(opt, m, gamma=0.01)
    atk = PGD(m, eps=8 / 255, alpha=2 / 255, steps=attack_steps, check_range=False)

    def step(x, y):
        x_adv = atk(x, y)
        awp.perturb(lambda: F.cross_entropy(m(x_adv), y))
        loss = F.cross_entropy(m(x_adv), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        awp.step()
        return loss.detach()

    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(batch, in_ch, size, size, generator=g).to(dev, dtype)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    return step, (x, y), primed


def run_model(name, a, dev, dtype):
    import torch
    from awpfast.compiled import DynamoEvents, compile_mode
    batch, size, k = DEFAULTS.get(name, (8, 32, 2))
    batch = a.batch or batch
    k = a.attack_steps if a.attack_steps is not None else k
    row = {"model": name, "dtype": str(dtype).replace("torch.", ""), "batch": batch, "image": size,
           "attack_steps": k, "backend": a.backend}
    mode = a.mode or compile_mode(dev)
    row["mode"] = mode if a.backend == "inductor" else None

    step, args, primed = build(name, dev, dtype, batch, size, k)
    row["base_state_primed"] = primed
    row["load_eager"] = [_load()]
    _timed(step, args, a.warmup, dev)
    row["eager"] = _stats(_timed(step, args, a.steps, dev))
    row["load_eager"].append(_load())
    print(f"{name}: eager {row['eager']['median_ms']} ms/step", flush=True)

    compile_kw = {"backend": a.backend} if a.backend != "inductor" else {"mode": mode}
    for phase in ("cold", "warm") if a.warm else ("cold",):
        torch._dynamo.reset()
        step, args, _ = build(name, dev, dtype, batch, size, k)
        cstep = torch.compile(step, **compile_kw)
        row[f"load_{phase}"] = [_load()]
        _sync(dev)
        t0 = time.perf_counter()
        with DynamoEvents() as ev:
            cstep(*args)
        _sync(dev)
        row[f"compile_{phase}_s"] = round(time.perf_counter() - t0, 2)
        row[f"load_{phase}"].append(_load())
        if phase == "cold":
            row["graphs"] = ev.graphs
            row["graph_breaks"] = sorted({f"{os.path.relpath(s, ROOT) if s.startswith('/') else s}: {r}"
                                          for s, r in ev.breaks})
            row["fallbacks"] = [r for _, r in ev.fallbacks]
            row["fallbacks_in_awpfast"] = [r for _, r in ev.in_package(ev.fallbacks)]
        print(f"{name}: compile {phase} {row[f'compile_{phase}_s']} s, {ev.graphs} graphs", flush=True)
    # steady state (after the warm compile): warm-up calls, then the measured ones
    with DynamoEvents() as ev:
        _timed(cstep, args, max(a.warmup, 1), dev)
        row["load_compiled"] = [_load()]
        row["compiled"] = _stats(_timed(cstep, args, a.steps, dev))
        row["load_compiled"].append(_load())
    row["steady_state"] = {"graphs": ev.graphs, "frames": ev.frames, "recompiles": ev.recompiles}
    row["speedup"] = round(row["eager"]["median_ms"] / row["compiled"]["median_ms"], 3)
    print(f"{name}: compiled {row['compiled']['median_ms']} ms/step ({row['speedup']}x), steady state "
          f"compiled {ev.frames} frames", flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="small-cnn,preact18")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=None, help="default: per model (small-cnn 32, preact18 8)")
    p.add_argument("--attack-steps", type=int, default=None, help="default: per model (3, 2; wrn34-10 10)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per variant (median over them)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (eager/aot_eager: plumbing)")
    p.add_argument("--mode", default=None, help="default: awpfast.compiled.compile_mode(device)")
    p.add_argument("--no-warm", dest="warm", action="store_false",
                   help="skip the warm compile (the steady state then runs on the cold-compiled step)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # a cold compile is cold
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="awpfast_inductor_")
    import torch
    from _bench_io import write_json
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    out = {"benchmark": "bench_compile", "argv": sys.argv[1:] if argv is None else argv, "torch": torch.__version__,
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
           "threads": torch.get_num_threads(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "loadavg_start": _load(), "rows": [], "complete": False}
    for name in a.models.split(","):
        try:
            out["rows"].append(run_model(name, a, dev, dtype))
        except Exception as e:  # one model's failure is a row, not the end of the run
            out["rows"].append({"model": name, "error": f"{type(e).__name__}: {str(e)[:500]}"})
            print(f"{name}: {type(e).__name__}: {e}", flush=True)
        if a.json:
            write_json(a.json, out, announce=False)
    out["loadavg_end"], out["complete"] = _load(), True
    if a.json:
        write_json(a.json, out)
    return 0 if all("error" not in r for r in out["rows"]) else 1


# --------------------------------------------------------------------------- the results, read here only
def verdict(data):
    """``(ok, rows not ok)``: every model compiled without an error, no fallback to eager inside
    awpfast, nothing compiled again in steady state, the run complete."""
    from _bench_io import rows_verdict
    return rows_verdict(data, lambda r: "error" in r or r.get("fallbacks_in_awpfast")
                        or (r.get("steady_state") or {}).get("frames"),
                        ("model", "error", "fallbacks_in_awpfast", "steady_state"), complete_default=False)


def _q(s):
    return f"{s['median_ms']:.1f} [{s['q1_ms']:.1f}, {s['q3_ms']:.1f}]" if s else "-"


def summary_lines(data):
    """Text lines of the JSON ``main`` writes: per model the eager and compiled step, median ms
    [q1, q3], the compile times cold and warm, graphs, graph breaks, fallbacks inside awpfast,
    what steady state compiled again; the load average at the start and the end (1 / 5 / 15 min)."""
    rows = data.get("rows") or []
    if not rows:
        return []
    out = [f"  whole AT-AWP step eager vs torch.compile on {data.get('device')} ({data.get('threads')} threads): "
           "ms median [q1, q3]"]
    for r in rows:
        if "error" in r:
            out.append(f"    {r.get('model')}: error {r['error'][:120]}")
            continue
        ss = r.get("steady_state") or {}
        out.append(f"    {r['model']} {r.get('dtype')} batch {r.get('batch')} PGD-{r.get('attack_steps')} "
                   f"({r.get('backend')}, {r.get('mode')}): eager {_q(r.get('eager'))}, compiled "
                   f"{_q(r.get('compiled'))}, {r.get('speedup', float('nan')):.2f}x")
        out.append(f"      compile cold {r.get('compile_cold_s', float('nan')):.1f} s, warm "
                   f"{r.get('compile_warm_s', float('nan')):.1f} s; {r.get('graphs')} graphs, "
                   f"{len(r.get('graph_breaks') or [])} graph-break sites, "
                   f"{len(r.get('fallbacks_in_awpfast') or [])} fallbacks in awpfast; steady state: "
                   f"{ss.get('frames', '?')} frames compiled again")
    from _bench_io import load_lines
    return out + load_lines(data, "loadavg_start", "loadavg_end")


def targets(data):
    """None: compiling cleanly is this benchmark's ``verdict``; its times have no stated goal."""
    return {}


if __name__ == "__main__":
    sys.exit(main())
