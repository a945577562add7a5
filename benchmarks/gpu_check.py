#!/usr/bin/env python
"""One-shot check of awpfast on a CUDA machine; finishes within about 8 minutes on an H100.

    python benchmarks/gpu_check.py OUT_JSON [--budget SECONDS] [--dry-run]

Steps (each a subprocess with a timeout; a failure is recorded and the next step runs):

  a. ``pip install --no-build-isolation --no-deps -e .`` (builds awpfast._C / the CUDA
     extension when csrc/ is there);
  b. the CUDA test subset: ``pytest -q -x`` over tests/test_triton.py, tests/test_native.py,
     tests/test_ops.py (those that exist);
  c. device-to-device copy bandwidth (1 GiB buffers, bytes read + written, CUDA events);
  d. benchmarks/bench_weight_side.py (perturb+restore, PreActResNet-18 and WRN-34-10,
     fp32 and bf16), benchmarks/bench_pgd.py (PGD L-inf / L2 step, batch 128x3x32x32) and
     benchmarks/bench_train_step.py when present;
  e. a summary table (with the issue's targets checked) and everything in OUT_JSON: device,
     torch / triton / CUDA versions, numbers, test results, logs' tails.

``--dry-run`` exercises the plumbing on a machine without CUDA (no install, test
collection only, CPU benchmarks with tiny repetitions) so the script can be verified
before the GPU session. Without CUDA and without ``--dry-run`` it exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAIL = 4000


def _tail(s, n=TAIL):
    s = s or ""
    return s[-n:]


class Clock:
    def __init__(self, budget):
        self.t0, self.budget = time.time(), budget

    def left(self):
        return self.budget - (time.time() - self.t0)


def run_step(name, cmd, timeout, env=None):
    """Run a command; never raises. Returns a record with rc, seconds and output tails."""
    rec = {"name": name, "cmd": cmd, "timeout_s": round(timeout, 1)}
    if timeout < 10:
        rec.update(status="skipped", reason="no time left in the budget")
        print(f"[gpu_check] {name}: skipped (no time left)", flush=True)
        return rec
    print(f"[gpu_check] {name}: {' '.join(cmd)} (timeout {timeout:.0f} s)", flush=True)
    t = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rec.update(rc=p.returncode, status="ok" if p.returncode == 0 else "failed",
                   stdout_tail=_tail(p.stdout), stderr_tail=_tail(p.stderr))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        rec.update(rc=None, status="timeout", stdout_tail=_tail(out), stderr_tail=_tail(err))
    except Exception as e:  # e.g. the executable is missing
        rec.update(rc=None, status="error", error=repr(e))
    rec["seconds"] = round(time.time() - t, 1)
    print(f"[gpu_check] {name}: {rec['status']} in {rec['seconds']} s", flush=True)
    return rec


def child_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU
    env.pop("AWPFAST_BACKEND", None)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def versions():
    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch
        info.update(torch=torch.__version__, cuda_runtime=torch.version.cuda,
                    cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                        sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2 ** 30, 1),
                        l2_mib=round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1))
    except Exception as e:
        info["torch_error"] = repr(e)
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:
        info["triton"] = f"unavailable ({type(e).__name__})"
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = q.stdout.strip()
        except Exception:
            pass
    if shutil.which("nvcc"):
        try:
            q = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20)
            info["nvcc"] = q.stdout.strip().splitlines()[-1] if q.stdout else ""
        except Exception:
            pass
    try:
        q = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        info["git_commit"] = q.stdout.strip()
    except Exception:
        pass
    return info


def copy_bandwidth(dry):
    """Large copy bandwidth in GB/s (1e9 bytes, read + write), median of 20."""
    import torch
    cuda = torch.cuda.is_available() and not dry
    nbytes = (1 << 30) if cuda else (64 << 20)
    dev = "cuda" if cuda else "cpu"
    try:
        src = torch.empty(nbytes // 4, device=dev).uniform_()
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        samples = []
        for _ in range(20 if cuda else 3):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                dst.copy_(src)
                b.record()
                b.synchronize()
                samples.append(a.elapsed_time(b) * 1e-3)
            else:
                t = time.perf_counter()
                dst.copy_(src)
                samples.append(time.perf_counter() - t)
        med = statistics.median(samples)
        res = {"device": dev, "bytes_per_buffer": nbytes, "median_s": med, "gbps": 2 * nbytes / med / 1e9,
               "best_gbps": 2 * nbytes / min(samples) / 1e9}
        del src, dst
        if cuda:
            torch.cuda.empty_cache()
        return res
    except Exception as e:
        return {"device": dev, "error": repr(e)}


def parse_pytest(rec):
    text = (rec.get("stdout_tail") or "") + "\n" + (rec.get("stderr_tail") or "")
    counts = {}
    for key in ("passed", "failed", "skipped", "error", "errors", "xfailed", "xpassed", "deselected"):
        m = re.findall(rf"(\d+) {key}\b", text)
        if m:
            counts["errors" if key == "error" else key] = int(m[-1])
    lines = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return {"counts": counts, "failures": lines[:30]}


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except Exception:
        return None


def targets(weight, pgd, bw):
    """The issue's GPU targets, checked against the numbers (None: not measured)."""
    out = {}
    rows = (weight or {}).get("rows", [])

    def row(model, dtype, variant):
        return next((r for r in rows if r.get("model") == model and r.get("dtype") == dtype
                     and r.get("variant") == variant and "median_ms" in r), None)

    tri, fe, ref = row("wrn34-10", "float32", "triton"), row("wrn34-10", "float32", "foreach"), \
        row("wrn34-10", "float32", "reference-eager")
    if tri:
        floor_own = None
        if bw and bw.get("gbps"):
            floor_own = 8 * tri["elements"] * 4 / (bw["gbps"] * 1e9) * 1e3
        out["wrn_fp32_x_floor"] = {"value": tri["x_floor"], "target": "<= 1.25", "ok": tri["x_floor"] <= 1.25,
                                   "x_floor_at_1GiB_copy_bw": tri["median_ms"] / floor_own if floor_own else None}
        if fe:
            v = fe["median_ms"] / tri["median_ms"]
            out["wrn_fp32_vs_foreach"] = {"value": v, "target": ">= 2", "ok": v >= 2}
        if ref:
            v = ref["median_ms"] / tri["median_ms"]
            out["wrn_fp32_vs_reference_eager"] = {"value": v, "target": ">= 20", "ok": v >= 20}
    prow = next((r for r in (pgd or {}).get("rows", []) if r["norm"] == "Linf" and r["dtype"] == "float32"
                 and r["impl"] == "triton"), None)
    if prow:
        out["pgd_linf_vs_eager"] = {"value": prow["speedup_vs_eager"], "target": ">= 3",
                                    "ok": (prow["speedup_vs_eager"] or 0) >= 3}
        out["pgd_linf_launches"] = {"value": prow["kernels"], "target": "== 1", "ok": prow["kernels"] == 1}
    return out


def summary(res):
    v = res["versions"]
    lines = [f"awpfast gpu_check on {v.get('device', 'no CUDA device')} | torch {v.get('torch')} "
             f"(CUDA {v.get('cuda_runtime')}) | triton {v.get('triton')} | python {v.get('python')}"]
    for st in res["steps"]:
        extra = ""
        if st["name"] == "tests" and "pytest" in res:
            extra = " " + ", ".join(f"{k} {n}" for k, n in res["pytest"]["counts"].items())
        lines.append(f"  step {st['name']:14s} {st['status']:8s} {st.get('seconds', 0):6.1f} s{extra}")
    bw = res.get("copy_bandwidth") or {}
    if "gbps" in bw:
        lines.append(f"  copy bandwidth ({bw['device']}, {bw['bytes_per_buffer'] >> 20} MiB): {bw['gbps']:.0f} GB/s "
                     f"median, {bw['best_gbps']:.0f} GB/s best (read+write)")
    w = res.get("weight_side")
    if w and w.get("rows"):
        lines.append(f"  weight side perturb+restore (bench copy bw {w.get('copy_bandwidth_gbs', 0):.0f} GB/s):")
        lines.append(f"    {'model':9s} {'dtype':9s} {'variant':16s} {'ms':>9s} {'x floor':>8s} {'vs ref':>8s} {'vs foreach':>10s}")
        for r in w["rows"]:
            if "median_ms" not in r:
                lines.append(f"    {r['model']:9s} {r['dtype']:9s} {r['variant']:16s} error {r.get('error', '')[:50]}")
                continue
            vf = r.get("speedup_vs_foreach")
            lines.append(f"    {r['model']:9s} {r['dtype']:9s} {r['variant']:16s} {r['median_ms']:9.3f} "
                         f"{r['x_floor']:8.2f} {(r.get('speedup_vs_reference') or 0):7.1f}x "
                         f"{(vf or 0):9.2f}x")
    p = res.get("pgd")
    if p and p.get("rows"):
        shp = "x".join(str(d) for d in [p.get("batch", "?")] + list(p.get("shape", [])))
        lines.append(f"  PGD step (batch {shp}):")
        lines.append(f"    {'norm':5s} {'dtype':9s} {'impl':8s} {'us':>9s} {'vs eager':>9s} {'GB/s':>7s} {'kernels':>7s}")
        for r in p["rows"]:
            lines.append(f"    {r['norm']:5s} {r['dtype']:9s} {r['impl']:8s} {r['median_us']:9.1f} "
                         f"{(r['speedup_vs_eager'] or 0):8.2f}x {r['GBps']:7.0f} "
                         f"{'-' if r['kernels'] is None else r['kernels']:>7}")
    t = res.get("train_step")
    if t and t.get("rows"):
        lines.append("  train step (bench_train_step.py):")
        for r in t["rows"]:
            lines.append("    " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in r.items()))
    if res.get("targets"):
        lines.append("  targets:")
        for k, tv in res["targets"].items():
            val = tv["value"]
            val = f"{val:.3g}" if isinstance(val, float) else str(val)
            lines.append(f"    {k:28s} {val:>8s} (target {tv['target']}) {'OK' if tv['ok'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_json")
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for the whole run (default 470)")
    ap.add_argument("--dry-run", action="store_true", help="exercise the plumbing without CUDA")
    ap.add_argument("--skip-install", action="store_true")
    a = ap.parse_args(argv)

    import torch
    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run:
        msg = ("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False). Run it on a "
               "CUDA machine, or pass --dry-run to exercise the plumbing on the CPU.")
        print(msg, file=sys.stderr)
        with open(a.out_json, "w") as f:
            json.dump({"error": msg, "versions": versions()}, f, indent=1)
        return 2
    dry = a.dry_run or not cuda
    clock = Clock(a.budget)
    env = child_env()
    py = sys.executable
    res = {"dry_run": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": a.budget, "steps": []}
    tmp = tempfile.mkdtemp(prefix="awpfast_gpu_check_")

    def budget_for(cap, reserve):
        return max(0.0, min(cap, clock.left() - reserve))

    # a. build / install
    if dry or a.skip_install:
        res["steps"].append({"name": "install", "status": "skipped",
                             "reason": "dry run" if dry else "--skip-install"})
    else:
        res["steps"].append(run_step("install", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                                                 "-e", "."], budget_for(170, 250), env))
    res["versions"] = versions()
    try:  # what the install left importable
        q = subprocess.run([py, "-c", "import awpfast.ops as o; print(','.join(o.available_backends()))"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        res["backends"] = q.stdout.strip().split(",") if q.returncode == 0 else f"error: {_tail(q.stderr, 500)}"
    except Exception as e:
        res["backends"] = f"error: {e!r}"

    # b. CUDA test subset
    tests = [t for t in ("tests/test_triton.py", "tests/test_native.py", "tests/test_ops.py")
             if os.path.exists(os.path.join(ROOT, t))]
    if tests:
        cmd = [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"] + tests
        if dry:
            cmd = [py, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider"] + tests
        rec = run_step("tests", cmd, budget_for(150, 170), env)
        res["steps"].append(rec)
        res["pytest"] = parse_pytest(rec)

    # c. copy bandwidth
    t = time.time()
    res["copy_bandwidth"] = copy_bandwidth(dry)
    res["steps"].append({"name": "copy_bandwidth", "status": "error" if "error" in res["copy_bandwidth"] else "ok",
                         "seconds": round(time.time() - t, 1)})

    # d. benchmarks
    dev = "cpu" if dry else "cuda"
    wjson, pjson, tjson = (os.path.join(tmp, n) for n in ("weight.json", "pgd.json", "train.json"))
    wcmd = [py, "benchmarks/bench_weight_side.py", "--device", dev, "--json", wjson]
    pcmd = [py, "benchmarks/bench_pgd.py", "--device", dev, "--json", pjson]
    if dry:
        wcmd += ["--models", "preact18", "--reps", "1"]
        pcmd += ["--reps", "1", "--inner", "1", "--batch", "8"]
    else:
        wcmd += ["--dtypes", "float32,bfloat16"]
        pcmd += ["--dtypes", "float32,bfloat16"]
    has_train = os.path.exists(os.path.join(ROOT, "benchmarks/bench_train_step.py"))
    res["steps"].append(run_step("bench_weight", wcmd, budget_for(120, 70 if has_train else 40), env))
    res["weight_side"] = load_json(wjson)
    res["steps"].append(run_step("bench_pgd", pcmd, budget_for(60, 40 if has_train else 0), env))
    res["pgd"] = load_json(pjson)
    if has_train:
        tcmd = [py, "benchmarks/bench_train_step.py", "--device", dev, "--json", tjson]
        tcmd += ["--batch", "4", "--attack-steps", "1", "--repeats", "1", "--model", "small-cnn"] if dry \
            else ["--batch", "128", "--model", "wrn34-10", "--repeats", "3"]
        res["steps"].append(run_step("bench_train", tcmd, budget_for(100, 5), env))
        res["train_step"] = load_json(tjson)

    # e. summary
    res["targets"] = targets(res.get("weight_side"), res.get("pgd"), res.get("copy_bandwidth"))
    res["elapsed_s"] = round(time.time() - clock.t0, 1)
    text = summary(res)
    res["summary"] = text
    print("\n" + text + f"\n  total {res['elapsed_s']} s" + (" (DRY RUN: CPU plumbing only)" if dry else ""))
    os.makedirs(os.path.dirname(os.path.abspath(a.out_json)), exist_ok=True)
    with open(a.out_json, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(f"wrote {a.out_json}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
