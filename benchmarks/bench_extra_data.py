"""Input throughput of the two-source loader (``awpfast-train --extra-data``) from a memory-mapped
``.npz``, against the model step it has to feed.

    python benchmarks/bench_extra_data.py --json benchmarks/results/DATE_cpu-2core_extra_data.json

Writes an uncompressed ``.npz`` of ``--images`` random CIFAR-shaped images (the generated-data
releases' layout) to a temporary folder, then times :class:`awpfast.extra_data.MixedBatches`
(batch 128, extra fraction 0.7, crop+flip) in img/s, median over ``--reps`` passes of ``--steps``
batches, with the background reader on and off, on a warm page cache and on a cold one (the file's
pages dropped with ``posix_fadvise(DONTNEED)`` before each pass, where the OS allows it). Next to it:
an AT-AWP training step (PGD-10, the small CNN at 32 px, batch 128) on this CPU, and the H100
WRN-34-10 AT-AWP step from the committed first GPU run, as the rates the loader must sustain.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_io import target, write_json  # noqa: E402

import awpfast  # noqa: E402
from awpfast.attacks import PGD  # noqa: E402
from awpfast.data import Split  # noqa: E402
from awpfast.extra_data import MixedBatches, open_extra, save_npz  # noqa: E402
from awpfast.models import build_model  # noqa: E402

H100_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "2026-11-27_h100", "gpu_check.json")


def _drop_cache(path: str) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def loader_rates(extra, base, steps, reps, configs, path):
    """img/s of each ``(name, prefetch, cold)`` config, the configs interleaved within each repetition
    (so that a loaded machine's noise falls on all of them alike); median, min and max per config."""
    rates = {name: [] for name, _, _ in configs}
    for r in range(reps):
        for name, prefetch, cold in configs:
            if cold:
                _drop_cache(path)
            mb = MixedBatches(base, extra, 128, 0.7, steps_per_epoch=steps, augment="crop+flip", seed=r,
                              prefetch=prefetch)
            t0 = time.perf_counter()
            n = sum(len(y) for _, y in mb)
            rates[name].append(n / (time.perf_counter() - t0))
    return {name: {"img_per_s": statistics.median(v), "min": min(v), "max": max(v), "reps": reps, "steps": steps}
            for name, v in rates.items()}


def model_step_rate(steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model("small-cnn", 10, 3, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    awp = awpfast.AWP(opt, model, gamma=0.01)
    attack = PGD(model, eps=8 / 255, alpha=2 / 255, steps=10)
    x, y = torch.rand(128, 3, 32, 32), torch.randint(0, 10, (128,))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        x_adv = attack(x, y)
        model.train()
        awp.perturb(lambda: F.cross_entropy(model(x_adv), y))
        awp.zero_grad()
        F.cross_entropy(model(x_adv), y).backward()
        awp.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    ms = 1000 * statistics.median(times)
    return {"model": "small-cnn width 32, 32 px, PGD-10, AT-AWP", "batch": 128, "step_ms": ms,
            "img_per_s": 128 / ms * 1000, "steps": steps}


def h100_step() -> dict:
    import json
    import bench_train_step
    import gpu_check
    try:
        with open(H100_JSON) as f:
            doc = json.load(f)
        step = bench_train_step.summary(gpu_check.result(doc, "bench_train"))["configs"]["awpfast bf16+cl"]
        ms = float(f"{step['at_awp_ms']:.1f}")  # as the run's summary line shows it
        return {"source": os.path.relpath(H100_JSON, os.path.dirname(H100_JSON) + "/../.."),
                "what": "WRN-34-10 AT-AWP step, batch 128, PGD-10, bf16 + channels_last (H100, 2026-11-27)",
                "step_ms": ms, "img_per_s": 128 / ms * 1000}
    except (OSError, KeyError, StopIteration, ValueError):
        return {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100_000, help="images in the generated .npz")
    p.add_argument("--steps", type=int, default=100, help="batches per timed pass")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--model-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"benchmark": "bench_extra_data", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "loadavg_start": os.getloadavg(), "images": args.images, "batch": 128, "extra_fraction": 0.7,
           "augment": "crop+flip", "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "generated.npz")
        t0 = time.perf_counter()
        save_npz(path, rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8),
                 rng.integers(0, 10, args.images))
        out["write_s"] = time.perf_counter() - t0
        out["file_bytes"] = os.path.getsize(path)
        extra = open_extra(path, 10, 32)
        assert extra.mapped, "the .npz must be memory-mapped"
        base = Split(torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (50_000,)))
        can_drop = _drop_cache(path)
        configs = [(f"{'cold' if cold else 'warm'}_cache_{'prefetch' if pf else 'no_prefetch'}", pf, cold)
                   for cold in ((False, True) if can_drop else (False,)) for pf in (True, False)]
        list(MixedBatches(base, extra, 128, 0.7, steps_per_epoch=5, seed=99))  # warm-up pass, not timed
        rows = loader_rates(extra, base, args.steps, args.reps, configs, path)
        for key, row in rows.items():
            print(f"  loader {key:28s} {row['img_per_s']:9.0f} img/s (min {row['min']:.0f}, max {row['max']:.0f})",
                  flush=True)
        out["loader"] = rows
    out["cpu_model_step"] = model_step_rate(args.model_steps)
    out["h100_model_step"] = h100_step()
    print(f"  CPU AT-AWP step (small CNN, batch 128): {out['cpu_model_step']['step_ms']:.0f} ms = "
          f"{out['cpu_model_step']['img_per_s']:.0f} img/s")
    need = max(1000.0, out["h100_model_step"].get("img_per_s", 0.0))
    worst = min(r["img_per_s"] for r in rows.values())
    out["target"] = {"need_img_per_s": need, "worst_loader_img_per_s": worst, "met": worst >= need,
                     "rule": ">= 1000 img/s at batch 128 and >= the H100 WRN-34-10 step's rate"}
    if out["h100_model_step"]:
        print(f"  H100 WRN-34-10 AT-AWP step (committed): {out['h100_model_step']['step_ms']:.1f} ms = "
              f"{out['h100_model_step']['img_per_s']:.0f} img/s")
    print(f"  target: loader >= {need:.0f} img/s: worst row {worst:.0f} -> {'MET' if worst >= need else 'MISSED'}")
    out["loadavg_end"] = os.getloadavg()
    if args.json:
        write_json(args.json, out)
    return 0


# --------------------------------------------------------------------------- the results, read here only
def summary_lines(data):
    """Text lines of the JSON ``main`` writes: per loader configuration the median img/s with the
    range over the repetitions, the CPU and H100 model steps it must feed, the target, the load
    average at the start and the end (1 / 5 / 15 min)."""
    loader = data.get("loader") or {}
    if not loader:
        return []
    out = [f"  two-source loader, batch {data.get('batch')}, extra fraction {data.get('extra_fraction')}, "
           f"{data.get('augment')}, {data.get('images') or 0:,} images memory-mapped: median img/s [min, max]"]
    for k, r in loader.items():
        out.append(f"    {k:24s} {r['img_per_s']:9.0f} img/s [{r['min']:.0f}, {r['max']:.0f}] "
                   f"({r.get('reps')} passes of {r.get('steps')} batches)")
    for key, what in (("cpu_model_step", "CPU AT-AWP step"), ("h100_model_step", "H100 AT-AWP step (committed)")):
        m = data.get(key) or {}
        if m:
            out.append(f"    {what}: {m['step_ms']:.1f} ms = {m['img_per_s']:.0f} img/s ({m.get('model') or m.get('what')})")
    t = data.get("target") or {}
    if t:
        out.append(f"    target: worst loader row {t['worst_loader_img_per_s']:.0f} img/s >= "
                   f"{t['need_img_per_s']:.0f} img/s: {'MET' if t.get('met') else 'MISSED'}")
    out.append("    load average start " + " / ".join(f"{v:.2f}" for v in data.get("loadavg_start") or [])
               + ", end " + " / ".join(f"{v:.2f}" for v in data.get("loadavg_end") or []))
    return out


def targets(data):
    """The loader's target as ``main`` judged it: the worst configuration's img/s at least the rate
    the model steps need (>= 1000 img/s and >= the committed H100 WRN-34-10 step's rate)."""
    t = data.get("target") or {}
    if not t:
        return {}
    return {"extra_data_loader_img_per_s": target(t.get("worst_loader_img_per_s"),
                                                  f">= {t.get('need_img_per_s', 0):.0f} img/s", t.get("met"),
                                                  note=t.get("rule"))}


if __name__ == "__main__":
    sys.exit(main())
