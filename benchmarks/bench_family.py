#!/usr/bin/env python
"""Weight-side cost of SAM, ASAM and Box AWP: awpfast against the per-parameter loops users run.

Times one perturbation + restore of the selected weights, the gradients already in ``.grad``
(the forward/backward passes are excluded: they are the same for every variant):

* ``loop`` (the straightforward per-parameter Python code, written from the published
  algorithms): SAM / adaptive SAM as davda54/sam's ``first_step`` + ``second_step`` (a
  stacked per-parameter norm, ``p.data.clone()`` backup, ``e_w`` temporary, ``p.data = old_p``
  restore); Box AWP as the competition notebooks' class (``clone`` backup, ``adv_eps*|w|``
  bounds, per-tensor norms with an ``if norm != 0`` host check, ``torch.min(torch.max(...))``
  and ``param.data`` rebinding, ``param.data = backup`` restore).
* one row per awpfast backend: the wrapper's ``perturb()`` from ``.grad`` + ``restore()``
  (engine overhead included: selection check, one finiteness host sync for SAM).

Rules: ``sam`` (rho 0.05, every parameter), ``asam`` (adaptive, eta 0 as the davda54 loop computes
it, every parameter),
``box`` (adv_lr 1, adv_eps 0.2, parameters named ``*weight*``).
Bytes floor (N selected elements, b bytes each) at the copy bandwidth measured in the same
run: SAM 7*N*b (norm reads g; apply reads w, g, writes w and the backup; restore reads the
backup, writes w); ASAM and Box 8*N*b (the norm pass also reads w).

Parameter sets: ``bert-base`` (the tensor shapes of BERT-base: 12 layers, hidden 768, 199
tensors, 109.5 M elements; built directly, no transformers needed), ``bert-large`` (24 layers,
hidden 1024, 391 tensors; not run by default), ``wrn34-10`` (awpfast.models.WideResNet(34, 10)).

Prints a table; ``--json PATH`` (default ``benchmarks/results/<date>_<device>_family.json``).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_io import load_lines, write_json  # noqa: E402
import awpfast.ops as ops  # noqa: E402
from awpfast import SAM, BoxAWP  # noqa: E402
from awpfast.models import WideResNet  # noqa: E402

RHO, ADV_LR, ADV_EPS = 0.05, 1.0, 0.2


# --------------------------------------------------------------------------- parameter sets
def bert_shapes(layers=12, hidden=768, inter=3072, vocab=30522, positions=512, types=2):
    """(name, shape) of BERT's parameters (the Hugging Face names), pooler included."""
    out = [("embeddings.word_embeddings.weight", (vocab, hidden)),
           ("embeddings.position_embeddings.weight", (positions, hidden)),
           ("embeddings.token_type_embeddings.weight", (types, hidden)),
           ("embeddings.LayerNorm.weight", (hidden,)), ("embeddings.LayerNorm.bias", (hidden,))]
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            out += [(p + m + ".weight", (hidden, hidden)), (p + m + ".bias", (hidden,))]
        out += [(p + "attention.output.LayerNorm.weight", (hidden,)), (p + "attention.output.LayerNorm.bias", (hidden,)),
                (p + "intermediate.dense.weight", (inter, hidden)), (p + "intermediate.dense.bias", (inter,)),
                (p + "output.dense.weight", (hidden, inter)), (p + "output.dense.bias", (hidden,)),
                (p + "output.LayerNorm.weight", (hidden,)), (p + "output.LayerNorm.bias", (hidden,))]
    out += [("pooler.dense.weight", (hidden, hidden)), ("pooler.dense.bias", (hidden,))]
    return out


class ParamSet(nn.Module):
    """A module holding parameters of the given names and shapes (dots become underscores:
    the ``weight``/``bias`` suffixes, which the selection rules look at, stay)."""

    def __init__(self, named_shapes, dtype, device):
        super().__init__()
        for name, shape in named_shapes:
            self.register_parameter(name.replace(".", "_"),
                                    nn.Parameter(torch.randn(shape, dtype=dtype, device=device) * 0.02))


MODELS = {
    "bert-base": lambda dt, dev: ParamSet(bert_shapes(), dt, dev),
    "bert-large": lambda dt, dev: ParamSet(bert_shapes(24, 1024, 4096), dt, dev),
    "wrn34-10": lambda dt, dev: WideResNet(34, 10).to(device=dev, dtype=dt),
}


# --------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn, reps: int, warmup: int = 2):
        """(median, min, max) wall ms and the median process CPU ms (user + sys, all threads:
        on a machine shared with other jobs, the work done is steadier than the wall time)."""
        for _ in range(warmup):
            fn()
        self.sync()
        times, cpu = [], []
        for _ in range(reps):
            self.sync()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
        return statistics.median(times), min(times), max(times), statistics.median(cpu)


def copy_bandwidth_gbs(device, timer, nbytes=256 << 20, reps=10):
    """Read+write bandwidth of a large tensor copy (GB/s, 1e9 bytes)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    med = timer.median_ms(lambda: dst.copy_(src), reps)[0]
    return 2 * nbytes / (med * 1e-3) / 1e9


# --------------------------------------------------------------------------- the loops users run
def davda54_loop(model, adaptive):
    """SAM / adaptive SAM as davda54/sam's first_step + second_step (rho, one group)."""
    params = [p for p in model.parameters()]
    state = {}

    @torch.no_grad()
    def run():
        norm = torch.norm(torch.stack([((torch.abs(p) if adaptive else 1.0) * p.grad).norm(p=2)
                                       for p in params if p.grad is not None]), p=2)
        scale = RHO / (norm + 1e-12)
        for p in params:
            if p.grad is None:
                continue
            state[p] = p.data.clone()
            e_w = (torch.pow(p, 2) if adaptive else 1.0) * p.grad * scale.to(p)
            p.add_(e_w)
        for p in params:
            if p.grad is None:
                continue
            p.data = state[p]
    return run


def notebook_box_loop(model):
    """Box AWP as the competition notebooks' class: _save, _attack_step, _restore."""
    named = list(model.named_parameters())

    @torch.no_grad()
    def run():
        backup, backup_eps = {}, {}
        for name, param in named:
            if param.requires_grad and param.grad is not None and "weight" in name:
                backup[name] = param.data.clone()
                grad_eps = ADV_EPS * param.abs().detach()
                backup_eps[name] = (backup[name] - grad_eps, backup[name] + grad_eps)
        e = 1e-6
        for name, param in named:
            if param.requires_grad and param.grad is not None and "weight" in name:
                norm1 = torch.norm(param.grad)
                norm2 = torch.norm(param.data.detach())
                if norm1 != 0 and not torch.isnan(norm1):
                    r_at = ADV_LR * param.grad / (norm1 + e) * (norm2 + e)
                    param.data.add_(r_at)
                    param.data = torch.min(torch.max(param.data, backup_eps[name][0]), backup_eps[name][1])
        for name, param in named:
            if name in backup:
                param.data = backup[name]
    return run


def awpfast_rule(model, rule, backend):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if rule == "box":
        w = BoxAWP(opt, model, adv_lr=ADV_LR, adv_eps=ADV_EPS, backend=backend)
    else:
        w = SAM(opt, model, rho=RHO, adaptive=rule == "asam", backend=backend)  # eta 0: davda54's adaptive SAM

    def run():
        w.perturb()
        w.restore()
    return run, w


def selected(model, rule):
    return [p for n, p in model.named_parameters() if rule != "box" or "weight" in n]


FLOOR_PASSES = {"sam": 7, "asam": 8, "box": 8}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--models", default="bert-base,wrn34-10")
    ap.add_argument("--rules", default="sam,asam,box")
    ap.add_argument("--backends", default=None, help="awpfast backends (default: every available one but reference)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    timer = Timer(device)
    backends = args.backends.split(",") if args.backends else [
        b for b in ops.available_backends() if b != "reference"
        and ops.get_backend(b, device, dtype).__name__.endswith(b)]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    bw = copy_bandwidth_gbs(device, timer)
    rows = []
    for mname in args.models.split(","):
        torch.manual_seed(0)
        model = MODELS[mname](dtype, device)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        for rule in args.rules.split(","):
            sel = selected(model, rule)
            n = sum(p.numel() for p in sel)
            floor_ms = FLOOR_PASSES[rule] * n * sel[0].element_size() / (bw * 1e9) * 1e3
            variants = [("loop", notebook_box_loop(model) if rule == "box" else davda54_loop(model, rule == "asam"))]
            for be in backends:
                run, _ = awpfast_rule(model, rule, be)
                variants.append((be, run))
            base = base_cpu = None
            for vname, fn in variants:
                med, lo, hi, cpu = timer.median_ms(fn, args.reps)
                if vname == "loop":
                    base, base_cpu = med, cpu
                own = [] if vname == "loop" else [op for op in ("global_sqnorm", "asam_apply_", "box_perturb_")
                                                  if hasattr(ops.get_backend(vname, device, dtype), op)]
                rows.append({"model": mname, "rule": rule, "variant": vname, "dtype": args.dtype, "own_family_ops": own,
                             "median_ms": med, "min_ms": lo, "max_ms": hi, "tensors": len(sel), "elements": n,
                             "floor_ms": floor_ms, "x_floor": med / floor_ms, "speedup_vs_loop": base / med,
                             "cpu_ms": cpu, "cpu_speedup_vs_loop": base_cpu / cpu})
        del model
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "device_type": device.type, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "copy_bandwidth_gbs": bw, "reps": args.reps, "loadavg_at_start": load,
           "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None, "rows": rows}
    print(f"\nweight-side perturb+restore on {out['device']} ({device.type}, {out['threads']} threads, "
          f"load {load}); copy bandwidth {bw:.1f} GB/s")
    print(f"{'model':9s} {'rule':5s} {'variant':8s} {'tensors':>7s} {'M elem':>7s} {'median ms':>10s} "
          f"{'x floor':>8s} {'vs loop':>8s} {'cpu ms':>9s} {'cpu vs loop':>11s}")
    for r in rows:
        print(f"{r['model']:9s} {r['rule']:5s} {r['variant']:8s} {r['tensors']:7d} {r['elements'] / 1e6:7.1f} "
              f"{r['median_ms']:10.2f} {r['x_floor']:8.2f} {r['speedup_vs_loop']:8.2f} {r['cpu_ms']:9.1f} "
              f"{r['cpu_speedup_vs_loop']:11.2f}")
    print("(floor = 7 (SAM) or 8 (ASAM, Box) * N * bytes / copy bandwidth; medians of "
          f"{args.reps} runs)")
    missing = sorted({r["variant"] for r in rows if r["variant"] not in ("loop", "foreach") and not r["own_family_ops"]})
    if missing:
        print(f"note: {', '.join(missing)} has no kernels of its own for the family ops yet: those rows run "
              "the foreach implementation (restore included from the backend)")
    if not args.no_json:
        path = args.json or os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results",
            f"{time.strftime('%Y-%m-%d')}_{device.type}-{os.cpu_count()}core-{out['threads']}thread_family.json")
        write_json(path, out)
    return out


# --------------------------------------------------------------------------- the results, read here only
def summary_lines(data):
    """Text lines of the JSON ``main`` writes: per (model, rule, variant) the median ms with the
    range over the repetitions, x the bytes floor, against the loop (wall and CPU time); the load
    average at the start and the end (1 / 5 / 15 min)."""
    rows = data.get("rows") or []
    if not rows:
        return []
    out = [f"  family weight side on {data.get('device')} ({data.get('device_type')}, {data.get('threads')} threads, "
           f"copy bw {data.get('copy_bandwidth_gbs', 0):.1f} GB/s): median ms [min, max] of {data.get('reps')}, "
           "x floor, vs loop, cpu ms, cpu vs loop"]
    for r in rows:
        out.append(f"    {r['model']:10s} {r['rule']:5s} {r['variant']:8s} {r['median_ms']:9.2f} "
                   f"[{r['min_ms']:.2f}, {r['max_ms']:.2f}] {r['x_floor']:6.2f}x {r['speedup_vs_loop']:6.2f}x "
                   f"{r['cpu_ms']:9.1f} {r['cpu_speedup_vs_loop']:6.2f}x")
    return out + load_lines(data, "loadavg_at_start", "loadavg_at_end")


def targets(data):
    """None: a comparison against the users' per-parameter loops, with no stated goal to meet."""
    return {}


if __name__ == "__main__":
    main()
