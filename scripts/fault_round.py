"""A fault round against ``awpfast-train``: kills, concurrent runs, signals and bad inputs, counted.

    python scripts/fault_round.py [--kills 12] [--pairs 5] [--signals 6] [--json OUT.json]

1. **kills**: a tiny run is SIGKILLed at random moments and resumed with ``--resume`` until it
   finishes; its ``last.pt``, ``best.pt`` and ``metrics.jsonl`` must equal an uninterrupted run's
   bit for bit, with no ``.tmp`` left.
2. **concurrent runs**: two launches on one fresh ``--out`` at the same moment: exactly one trains
   (exit 0), the other is refused (exit 2) naming the holder or the run already there, and the
   folder holds one consistent run.
3. **signals**: SIGINT / SIGTERM at random moments: exit 130 / 143 with one line, no ``.tmp``, and
   the resumed run again equals the uninterrupted one.
4. **bad inputs**: each command of :data:`BAD` exits 2 with one line and no traceback, and writes nothing.

Prints the counts and writes them as JSON (with the machine and the load average).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "synthetic", "--image-size", "8", "--model", "small-cnn", "--width", "4", "--batch-size", "32",
        "--attack-steps", "2", "--eval-steps", "1", "--eval-samples", "32", "--train-eval-samples", "32",
        "--train-samples", "128", "--val-samples", "32", "--epochs", "6", "--seed", "3", "--threads", "1",
        "--no-progress", "--quiet"]
BAD = [  # (what, extra options)
    ("gamma 1e30", ["--awp-gamma", "1e30"]),
    ("negative lr", ["--lr", "-0.1"]),
    ("eps beyond [0, 1]", ["--eps", "2"]),
    ("eps not a number", ["--eps", "eight"]),
    ("warm-up longer than the run", ["--awp-warmup", "9"]),
    ("eps warm-up longer than the run", ["--eps-warmup", "9"]),
    ("train samples beyond the data", ["--train-samples", "100000"]),
    ("attack-sourced ascent with 3 steps", ["--awp-ascent", "attack", "--awp-steps", "3"]),
    ("sub-batch with the attack-sourced ascent", ["--awp-ascent", "attack", "--awp-ascent-fraction", "0.5"]),
    ("sub-batch fraction 0", ["--awp-ascent-fraction", "0"]),
    ("momentum ascent without momentum", ["--awp-ascent", "momentum", "--momentum", "0"]),
    ("awp-every 0", ["--awp-every", "0"]),
    ("unknown backend", ["--backend", "cuda-magic"]),
    ("abbreviated option", ["--label-nois", "0.2"]),
    ("cifar10 without data dir", ["--data", "cifar10"]),
    ("resume of a missing file", ["--resume", "/nonexistent/last.pt"]),
    ("device cuda without CUDA", ["--device", "cuda"]),
]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def _cmd(extra):
    return [sys.executable, "-m", "awpfast.train"] + extra


def _digest(out):
    h = {}
    for f in ("last.pt", "best.pt", "metrics.jsonl"):
        p = os.path.join(out, f)
        if os.path.isfile(p):
            if f.endswith(".pt"):
                import torch
                ck = torch.load(p, weights_only=False)
                hh = hashlib.sha256()
                for k in sorted(ck["model"]):
                    hh.update(ck["model"][k].numpy().tobytes())
                for i in sorted(ck["optimizer"]["state"]):
                    for v in ck["optimizer"]["state"][i].values():
                        hh.update(v.numpy().tobytes())
                h[f] = (int(ck["epoch"]), hh.hexdigest())
            else:
                rows = [json.loads(line) for line in open(p)]
                rows = [{k: v for k, v in r.items() if not k.endswith(("time_s", "img_per_s"))} for r in rows]
                h[f] = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    return h


def _tmp_files(out):
    return [f for f in os.listdir(out) if f.endswith(".tmp")] if os.path.isdir(out) else []


def reference(base):
    out = os.path.join(base, "reference")
    subprocess.run(_cmd(TINY + ["--out", out]), env=_env(), check=True, capture_output=True)
    return _digest(out)


def _until_done(out, ref, interrupt, n, rng, log):
    """Start / resume the run, interrupt it ``n`` times (``interrupt(p)``), then let it finish."""
    done = 0
    while True:
        started = os.path.isfile(os.path.join(out, "last.pt"))
        extra = ["--resume", os.path.join(out, "last.pt")] if started else TINY + ["--out", out]
        p = subprocess.Popen(_cmd(extra), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if done < n:
            time.sleep(rng.uniform(1.0, 7.0))
            if p.poll() is None:
                code = interrupt(p)
                _, err = p.communicate(timeout=120)
                log.append({"returncode": p.returncode, "expected": code, "stderr_last": err.strip()[-200:],
                            "tmp_left": _tmp_files(out)})
                done += 1
                continue
        _, err = p.communicate(timeout=600)
        if p.returncode == 0:
            return done, _digest(out) == ref
        if "nothing to resume" in err:
            return done, _digest(out) == ref
        raise RuntimeError(f"run failed: {err[-500:]}")


def kills(base, ref, n, rng):
    out = os.path.join(base, "killed")
    log = []

    def kill(p):
        p.send_signal(signal.SIGKILL)
        return -9
    k, same = _until_done(out, ref, kill, n, rng, log)
    return {"kills": k, "final_equals_uninterrupted": same, "tmp_left_at_the_end": _tmp_files(out),
            "killed_before_any_checkpoint": sum(1 for e in log if e["returncode"] == -9) - 0}


def signals(base, ref, n, rng):
    out = os.path.join(base, "signalled")
    log = []
    sigs = [signal.SIGINT, signal.SIGTERM]

    def send(p):
        s = sigs[len(log) % 2]
        p.send_signal(s)
        return 128 + s
    k, same = _until_done(out, ref, send, n, rng, log)
    ok = [e for e in log if e["returncode"] == e["expected"] and not e["tmp_left"]
          and e["stderr_last"].splitlines()[-1].startswith("awpfast-train: stopped by SIG")]
    return {"signals": k, "clean_stops": len(ok), "final_equals_uninterrupted": same,
            "details": [{k2: v for k2, v in e.items() if k2 != "stderr_last"} for e in log]}


def concurrent(base, pairs):
    res = []
    for i in range(pairs):
        out = os.path.join(base, f"pair{i}")
        ps = [subprocess.Popen(_cmd(TINY + ["--out", out, "--epochs", "2"]), env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [(p.wait(timeout=600), p.stderr.read()) for p in ps]
        codes = sorted(c for c, _ in outs)
        refused = [e for c, e in outs if c == 2]
        named = all("in use by another awpfast-train run" in e or "already holds a run" in e for e in refused)
        rid = json.load(open(os.path.join(out, "args.json")))["run_id"]
        import torch
        consistent = torch.load(os.path.join(out, "last.pt"), weights_only=False)["run_id"] == rid
        res.append({"codes": codes, "refusal_named": named, "one_consistent_run": consistent})
    ok = sum(1 for r in res if r["codes"] == [0, 2] and r["refusal_named"] and r["one_consistent_run"])
    return {"pairs": pairs, "one_trained_one_refused": ok, "details": res}


def bad_inputs(base):
    res = []
    for what, extra in BAD:
        out = os.path.join(base, "bad", what.replace(" ", "_"))
        argv = list(TINY)
        if "--train-samples" in extra:
            i = argv.index("--train-samples")
            del argv[i:i + 2]
        p = subprocess.run(_cmd(argv + extra + ([] if "--resume" in extra else ["--out", out])), env=_env(),
                           capture_output=True, text=True, timeout=300)
        err = [line for line in p.stderr.strip().splitlines() if line.strip()]
        good = (p.returncode == 2 and "Traceback" not in p.stderr and 1 <= len(err) <= 2
                and not os.path.exists(os.path.join(out, "args.json")))
        res.append({"what": what, "returncode": p.returncode, "one_line": good, "message": err[0] if err else ""})
    return {"inputs": len(res), "refused_in_one_line": sum(r["one_line"] for r in res), "details": res}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--signals", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    base = tempfile.mkdtemp(prefix="awpfast-fault-")
    t0 = time.time()
    load0 = os.getloadavg()
    try:
        ref = reference(base)
        out = {"kills": kills(base, ref, a.kills, rng), "signals": signals(base, ref, a.signals, rng),
               "concurrent": concurrent(base, a.pairs), "bad_inputs": bad_inputs(base)}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    import platform
    import torch
    out["machine"] = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "load_start": load0, "load_end": os.getloadavg(), "elapsed_s": time.time() - t0,
                      "date": time.strftime("%Y-%m-%d %H:%M")}
    k, s, c, b = out["kills"], out["signals"], out["concurrent"], out["bad_inputs"]
    print(f"kills: {k['kills']} SIGKILLs, resumed each time; final run equals the uninterrupted one: "
          f"{k['final_equals_uninterrupted']}; .tmp left: {k['tmp_left_at_the_end']}")
    print(f"signals: {s['clean_stops']} of {s['signals']} SIGINT/SIGTERM stopped cleanly (exit 130/143, one line, no "
          f".tmp); final equals the uninterrupted run: {s['final_equals_uninterrupted']}")
    print(f"concurrent: {c['one_trained_one_refused']} of {c['pairs']} simultaneous pairs left one run and one "
          "named refusal")
    print(f"bad inputs: {b['refused_in_one_line']} of {b['inputs']} refused in one line (exit 2, nothing written)")
    for r in b["details"]:
        if not r["one_line"]:
            print(f"  NOT ONE LINE: {r['what']}: exit {r['returncode']}: {r['message']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
