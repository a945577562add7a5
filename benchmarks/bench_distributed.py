"""AT-AWP training step on 1 process vs 2 DDP processes (gloo, CPU), and the communication
each ``ascent_sync`` mode adds.

Same global batch in every configuration (strong scaling: 2 processes each take half):
    * 1 process, plain module (no process group);
    * 2 processes, DDP, ``ascent_sync="global"`` (one extra all-reduce of the selected
      weights' ascent gradients per step) and ``"local"`` (no extra collective).
A step = PGD attack (on ``ddp.module``: input gradients need no sync) + AWP perturb + descent
forward/backward (DDP's gradient all-reduce) + SGD step. The median over the timed steps is
reported, with the bytes awpfast itself all-reduces per step (counted at
``torch.distributed.all_reduce``) next to the bytes DDP reduces for the descent gradients.

    python benchmarks/bench_distributed.py                       # small-cnn, batch 64, 3 PGD steps
    python benchmarks/bench_distributed.py --model preact18 --image-size 32 --batch 32 --json out.json

Numbers from a shared, loaded machine are noisy: the script prints the machine's load average.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import awpfast  # noqa: E402
from awpfast.attacks import PGD  # noqa: E402
from awpfast.models import create_model  # noqa: E402
from _bench_io import free_port, load_text, target  # noqa: E402


def _worker(rank, world, port, mode, args, out_path, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, in_channels=3)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model)
        inner = model.module
    else:
        inner = model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    awp = awpfast.AWP(opt, model, gamma=0.01, ascent_sync=mode if world > 1 else "global")
    attack = PGD(inner, eps=8 / 255, alpha=2 / 255, steps=args.attack_steps)
    local = args.batch // world
    g = torch.Generator().manual_seed(1)
    xs = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=g)
    ys = torch.randint(0, 10, (args.batch,), generator=g)
    x, y = xs[rank * local:(rank + 1) * local], ys[rank * local:(rank + 1) * local]

    counted = {"bytes": 0, "calls": 0}
    if world > 1:
        orig = dist.all_reduce

        def counting(t, *a, **k):
            counted["bytes"] += t.numel() * t.element_size()
            counted["calls"] += 1
            return orig(t, *a, **k)
        dist.all_reduce = counting  # awpfast's collectives go through the Python API; DDP's do not

    times = []
    for i in range(args.warmup + args.steps):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        x_adv = attack(x, y)
        model.train()
        awp.perturb(lambda: F.cross_entropy(model(x_adv), y))
        awp.zero_grad()
        F.cross_entropy(model(x_adv), y).backward()
        awp.step()
        times.append(time.perf_counter() - t0)
        if i == args.warmup - 1:
            counted.update(bytes=0, calls=0)
    if rank == 0:
        params = list(inner.parameters())
        sel = set(awp.perturbed_parameters)
        res = {"world": world, "mode": mode if world > 1 else "single", "threads_per_process": threads,
               "step_ms_median": 1e3 * statistics.median(times[args.warmup:]),
               "step_ms_all": [round(1e3 * t, 2) for t in times[args.warmup:]],
               "awpfast_allreduce_bytes_per_step": counted["bytes"] / args.steps,
               "awpfast_allreduce_calls_per_step": counted["calls"] / args.steps,
               "ddp_gradient_bytes_per_step": (sum(p.numel() * p.element_size() for p in params) if world > 1 else 0),
               "selected_weight_bytes": sum(p.numel() * p.element_size() for n, p in inner.named_parameters()
                                            if n in sel)}
        with open(out_path, "w") as f:
            json.dump(res, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(world, mode, args, threads):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        mp.spawn(_worker, args=(world, free_port(), mode, args, out, threads), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small-cnn")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64, help="global batch (split over the processes)")
    ap.add_argument("--attack-steps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads per process (default 1: on a shared machine, several spinning "
                         "OpenMP threads per process are slowed down by other load far more than 1)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.batch % 2:
        ap.error("--batch must be even (it is split over 2 processes)")
    if not (dist.is_available() and dist.is_gloo_available()):
        print("bench_distributed: torch.distributed with gloo is not available", file=sys.stderr)
        return 1
    rows = [run(1, "single", args, args.threads)]
    for mode in ("global", "local"):
        rows.append(run(2, mode, args, args.threads))
    base = rows[0]["step_ms_median"]
    print(f"AT-AWP step, {args.model} {args.image_size}px, global batch {args.batch}, PGD-{args.attack_steps}, "
          f"{args.threads} thread(s)/process, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    print(f"{'setting':<22}{'median ms':>10}{'vs 1 proc':>10}{'awpfast all-reduce B/step':>27}"
          f"{'DDP grad B/step':>17}")
    for r in rows:
        name = "1 process" if r["world"] == 1 else f"2 proc DDP {r['mode']}"
        print(f"{name:<22}{r['step_ms_median']:>10.1f}{base / r['step_ms_median']:>9.2f}x"
              f"{r['awpfast_allreduce_bytes_per_step']:>27,.0f}{r['ddp_gradient_bytes_per_step']:>17,.0f}")
    g, l_ = rows[1], rows[2]
    print(f"global adds {g['awpfast_allreduce_bytes_per_step']:,.0f} B/step (= the selected weights' gradients, "
          f"{g['selected_weight_bytes']:,} B) over local's {l_['awpfast_allreduce_bytes_per_step']:,.0f}")
    if args.json:
        meta = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                "torch": torch.__version__, "load_average": os.getloadavg(), "args": vars(args),
                "date": time.strftime("%Y-%m-%d")}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------- the results, read here only
def _setting(r):
    return "1 process" if r.get("world") == 1 else f"2 proc DDP {r.get('mode')}"


def summary_lines(data):
    """Text lines of the JSON ``main`` writes: per setting the median step ms with the range of the
    timed steps, the ratio to 1 process, the bytes awpfast and DDP all-reduce per step; the load
    average when the run ended (1 / 5 / 15 min)."""
    rows = data.get("results") or []
    if not rows:
        return []
    meta = data.get("meta") or {}
    a = meta.get("args") or {}
    base = rows[0].get("step_ms_median")
    out = [f"  AT-AWP step, {a.get('model')} {a.get('image_size')} px, global batch {a.get('batch')}, "
           f"PGD-{a.get('attack_steps')}, {a.get('threads')} thread(s)/process: median ms [min, max] of "
           f"{a.get('steps')} steps, vs 1 process, awpfast / DDP all-reduce bytes per step"]
    for r in rows:
        ts = r.get("step_ms_all") or [float("nan")]
        out.append(f"    {_setting(r):22s} {r['step_ms_median']:9.1f} ms [{min(ts):.1f}, {max(ts):.1f}] "
                   f"{base / r['step_ms_median']:6.2f}x {r.get('awpfast_allreduce_bytes_per_step', 0):12,.0f} B "
                   f"{r.get('ddp_gradient_bytes_per_step', 0):12,.0f} B")
    load = meta.get("load_average")
    if load:
        out.append(f"    load average at the end {load_text(load)} "
                   f"({meta.get('cpu_count')} CPUs)")
    return out


def targets(data):
    """What the ``ascent_sync`` modes promise, per 2-process row: ``global`` all-reduces exactly the
    selected weights' ascent gradients once per step, ``local`` nothing."""
    out = {}
    for r in data.get("results") or []:
        if r.get("world", 1) == 1:
            continue
        sent, sel = r.get("awpfast_allreduce_bytes_per_step"), r.get("selected_weight_bytes")
        if r.get("mode") == "global":
            out["ddp_global_ascent_allreduce_bytes"] = target(sent, "== the selected weights' bytes", sent == sel,
                                                              note=None if sel is None else f"{sel:,} B selected",
                                                              calls=r.get("awpfast_allreduce_calls_per_step"))
        elif r.get("mode") == "local":
            out["ddp_local_ascent_allreduce_bytes"] = target(sent, "== 0", sent == 0,
                                                             calls=r.get("awpfast_allreduce_calls_per_step"))
    return out


if __name__ == "__main__":
    sys.exit(main())
