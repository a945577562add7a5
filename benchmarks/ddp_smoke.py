#!/usr/bin/env python
"""Smoke test of AWP under DistributedDataParallel in ONE process (the GPU machine has one GPU).

Initializes a 1-rank process group (NCCL on CUDA, gloo on the CPU), wraps a small CNN in
``DistributedDataParallel`` and runs a few AWP training steps through
``awpfast.AWP(optimizer, ddp_model)``; the same steps on an identical plain model (no DDP)
give the expected weights. With one rank, DDP's gradient all-reduce is a mean over one
replica, so both runs must agree (bitwise here; the check allows 1e-6 relative for
reduction-order effects). Deterministic kernels, TF32 off.

    python benchmarks/ddp_smoke.py --device cuda --json out.json

Exit status 0 when the weights agree, 1 otherwise (the JSON says why), 2 on a setup error.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_io import free_port, target, write_json  # noqa: E402


def _steps(model, opt_model, x, y, steps, awp_cls, gamma):
    """``steps`` AWP steps (perturb with the closure, descent at w + v, base step)."""
    opt = torch.optim.SGD(model.parameters() if opt_model is None else opt_model.parameters(), lr=0.05,
                          momentum=0.9, weight_decay=5e-4)
    awp = awp_cls(opt, model, gamma=gamma)
    losses = []
    for i in range(steps):
        xb, yb = x[i], y[i]
        awp.perturb(lambda: F.cross_entropy(model(xb), yb))
        awp.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        awp.step()
        losses.append(float(loss.detach()))
    return losses


def run(device: str, steps: int, batch: int, gamma: float) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import awpfast
    from awpfast.models import create_model

    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "backend": backend,
           "steps": steps, "batch": batch, "gamma": gamma, "torch": torch.__version__}
    t0 = time.time()
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(dev)  # needs an index (torch 2.11 refuses a bare "cuda")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        base = create_model("small-cnn", num_classes=10).to(dev)
        g = torch.Generator().manual_seed(1)
        x = torch.rand(steps, batch, 3, 32, 32, generator=g).to(dev)
        y = torch.randint(0, 10, (steps, batch), generator=g).to(dev)

        plain = copy.deepcopy(base)
        res["plain_losses"] = _steps(plain, None, x, y, steps, awpfast.AWP, gamma)

        inner = copy.deepcopy(base)
        ddp = DDP(inner, device_ids=[dev.index or 0] if dev.type == "cuda" else None)
        res["ddp_losses"] = _steps(ddp, ddp, x, y, steps, awpfast.AWP, gamma)
        if dev.type == "cuda":
            torch.cuda.synchronize()

        diffs = []
        for (n, a), (_, b) in zip(plain.named_parameters(), inner.named_parameters()):
            d = float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0
            scale = float(a.detach().double().abs().max()) if a.numel() else 1.0
            diffs.append((n, d, d / max(scale, 1e-30)))
        worst = max(diffs, key=lambda t: t[2])
        moved = max(float((a.detach().double() - b.detach().double()).abs().max())
                    for a, b in zip(plain.parameters(), base.parameters()) if a.numel())
        res.update(max_abs_diff=max(d for _, d, _ in diffs), max_rel_diff=worst[2], worst_param=worst[0],
                   bitwise_equal=all(d == 0 for _, d, _ in diffs), weights_moved=moved)
        res["ok"] = bool(worst[2] <= 1e-6 and moved > 0 and all(map(lambda v: v == v, res["ddp_losses"])))
        if not res["ok"]:
            res["why"] = (f"DDP run differs from the plain run: max relative difference {worst[2]:.3g} "
                          f"at {worst[0]}" if worst[2] > 1e-6 else "the weights did not move")
    finally:
        dist.destroy_process_group()
    res["seconds"] = round(time.time() - t0, 2)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--gamma", type=float, default=0.01)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("ddp_smoke: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    try:
        res = run(a.device, a.steps, a.batch, a.gamma)
    except Exception as e:  # report, do not hide: this is what the smoke test is for
        res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    if a.json:
        write_json(a.json, res, announce=False, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "traceback"}, indent=1))
    if "traceback" in res:
        print(res["traceback"], file=sys.stderr)
    return 0 if res.get("ok") else 1


# --------------------------------------------------------------------------- the results, read here only
def verdict(data):
    """``(ok, rows not ok)``: the DDP run equal to the plain one (no rows to judge: None)."""
    return data.get("ok") is True, None


def summary_lines(data):
    """Text lines of the JSON ``main`` writes: the backend and device, the steps, the largest
    difference between the DDP and the plain run, how far the weights moved, or the error."""
    if not data:
        return []
    head = f"  ddp_smoke ({data.get('backend', '?')} on {data.get('device', '?')}): "
    if "error" in data:
        return [head + f"error {data['error'][:120]}" + (f" ({data['seconds']} s)" if "seconds" in data else "")]
    out = [head + f"{data.get('steps')} steps of batch {data.get('batch')}, gamma {data.get('gamma')}: "
           f"{'equal' if data.get('ok') else 'DIFFERENT'}, max relative difference {data.get('max_rel_diff', 0):.3g} "
           f"({'bitwise' if data.get('bitwise_equal') else 'not bitwise'}), weights moved "
           f"{data.get('weights_moved', 0):.3g}, {data.get('seconds')} s"]
    if data.get("why"):
        out.append(f"    {data['why']}")
    return out


def targets(data):
    """The GPU target: a 1-rank DDP model through awpfast.AWP takes the steps of the plain model."""
    if not data:
        return {}
    return {f"ddp_1rank_{data.get('backend', '')}_smoke": target(data.get("max_rel_diff"), "equal to no-DDP",
                                                                 data.get("ok") is True,
                                                                 note=data.get("why") or data.get("error"))}


if __name__ == "__main__":
    sys.exit(main())
