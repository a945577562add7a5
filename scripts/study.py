"""The study that decides which cheap AWP ascent keeps AWP's gain: arms paired by seed, verdicts computed.

The regime (docs/reproduction.md): scikit-learn's digits at 8x8, SmallCNN-32, 320 training images
with 20 % symmetric label noise, a train-mode PGD-10 attack (eps 0.15, ramped over 10 epochs),
200 epochs, LR 0.05 piecewise, batch 32; AWP (gamma 0.01) from epoch 11. Every run is the plain
``awpfast-train`` command (validation PGD-20 every epoch, test PGD-20 every 5 epochs and at every
new validation best), then ``python -m awpfast.evaluate`` of its ``last.pt`` on every held-out image
(the 500 test images and the 877 training images the run never used: 1377) with PGD-20 and
AutoAttack (torchattacks, standard).

    python scripts/study.py run --seeds 0-9 --jobs 2       # resumable: finished runs are skipped,
                                                           # killed ones resume from their last.pt
    python scripts/study.py status                         # what is done, running, left
    python scripts/study.py cost --model small-cnn         # CPU time of a training step per arm
    python scripts/study.py cost --model preact18
    python scripts/study.py table                          # docs/study.json, docs/study.md block, plot

Runs go to ``runs/study/ARM-sSEED`` (``--runs``); each records ``study_run.json`` (CPU model, torch,
load average, wall time, the command). Jobs run under ``nice -n 19`` with one thread each; all arms
of a seed run on this machine one after another (seed-major order), so that a pair never mixes two
CPUs' arithmetic.

Verdicts (design brief section 13), per cheap arm against exact AWP with the same attack mode,
computed from the per-seed values only: paired mean difference with its 95 % t interval;
**keeps the gain** when the lower bound of the 90 % interval of (arm - exact) is >= -1 point on
the mean of the last 3 test PGD-20 evaluations *and* on AutoAttack (two one-sided tests at 5 %)
and the arm's gain over AT is significant (95 % interval above 0) on both; **loses** when the upper
bound of the 95 % interval is < -1 point on either; otherwise **undecided**, with the number of
seeds the observed mean and spread would need.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(ROOT, "runs", "study")
OUT = os.path.join(ROOT, "docs", "study")

REGIME = ["--data", "digits", "--image-size", "8", "--model", "small-cnn", "--width", "32", "--method", "at",
          "--train-samples", "320", "--label-noise", "0.2", "--eps", "0.15", "--alpha", "0.0375",
          "--eps-warmup", "10", "--attack-steps", "10", "--attack-bn", "train", "--eval-steps", "20",
          "--lr", "0.05", "--lr-schedule", "piecewise", "--batch-size", "32", "--epochs", "200",
          "--train-eval-samples", "200", "--eval-every", "5", "--awp-gamma", "0"]
_AWP = ["--awp-gamma", "0.01", "--awp-warmup", "10", "--awp-cosine-every", "3"]
ARMS = {
    "AT": [],
    "AWP": _AWP,
    "attack": _AWP + ["--awp-ascent", "attack"],
    "AWP-evalbn": _AWP + ["--attack-bn", "eval"],
    "attack-evalbn": _AWP + ["--attack-bn", "eval", "--awp-ascent", "attack"],
    "every2": _AWP + ["--awp-every", "2"],
    "sub0.25": _AWP + ["--awp-ascent-fraction", "0.25"],
    "momentum": _AWP + ["--awp-ascent", "momentum"],
}
LABELS = {"AT": "AT", "AWP": "exact AT-AWP (gamma 0.01)", "attack": "attack-sourced",
          "AWP-evalbn": "exact AT-AWP, eval-mode attack", "attack-evalbn": "attack-sourced, eval-mode attack",
          "every2": "every 2 steps", "sub0.25": "sub-batch 0.25", "momentum": "momentum-sourced (pilot)"}
EXACT = {"attack-evalbn": "AWP-evalbn"}          # the exact arm a cheap arm is judged against (else "AWP")
CHEAP = ("attack", "attack-evalbn", "every2", "sub0.25", "momentum")
PILOT = {"momentum": 3}                           # seeds of a pilot arm, unless promoted
MARGIN = 1.0                                      # points of accuracy
AWP_FROM = 10                                     # epochs 1-10 train without AWP


# ----------------------------------------------------------------------------- Student t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        de = d * c
        h *= de
        if abs(de - 1.0) < 1e-15:
            break
    return h


def _ibeta(a: float, b: float, x: float) -> float:
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    x = df / (df + t * t)
    tail = 0.5 * _ibeta(df / 2, 0.5, x)
    return 1 - tail if t > 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`)."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def paired(diffs) -> dict | None:
    """Mean, s.d., n, t, the 90 % and 95 % two-sided t intervals of paired differences."""
    d = [v for v in diffs if v is not None and math.isfinite(v)]
    n = len(d)
    if n == 0:
        return None
    m = sum(d) / n
    out = {"mean": m, "n": n, "values": d}
    if n < 2:
        return out
    sd = math.sqrt(sum((v - m) ** 2 for v in d) / (n - 1))
    se = sd / math.sqrt(n)
    out.update(sd=sd, t=(m / se if se > 0 else (math.inf if m else 0.0)))
    for level, q in (("ci90", 0.95), ("ci95", 0.975)):
        h = t_quantile(q, n - 1) * se
        out[level] = [m - h, m + h]
    return out


def seeds_needed(mean: float, sd: float, margin: float = MARGIN, limit: int = 1000):
    """The smallest n at which the observed paired mean and s.d. would decide: the 90 % lower bound
    >= -margin (keeps) when ``mean > -margin``, the 95 % upper bound < -margin (loses) otherwise;
    None when no n up to ``limit`` does (mean exactly on the margin)."""
    for n in range(2, limit + 1):
        se = sd / math.sqrt(n)
        if mean > -margin and mean - t_quantile(0.95, n - 1) * se >= -margin:
            return n
        if mean < -margin and mean + t_quantile(0.975, n - 1) * se < -margin:
            return n
    return None


# ----------------------------------------------------------------------------- running
def _dir(runs: str, arm: str, seed: int) -> str:
    return os.path.join(runs, f"{arm}-s{seed}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = line.split(":", 1)[1].split()
                    return sorted(x for x in fl if x.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _state(d: str) -> str:
    """done (trained and evaluated), trained (evaluation left), started (resumable), new."""
    if os.path.isfile(os.path.join(d, "final_eval.json")):
        return "done"
    if os.path.isfile(os.path.join(d, "study_run.json")):
        return "trained"
    if os.path.isfile(os.path.join(d, "last.pt")):
        return "started"
    return "new"


def _train_cmd(arm: str, seed: int, d: str, resume: bool) -> list:
    base = [sys.executable, "-m", "awpfast.train"]
    if resume:
        return base + ["--resume", os.path.join(d, "last.pt"), "--quiet", "--no-progress"]
    return base + REGIME + ARMS[arm] + ["--seed", str(seed), "--out", d, "--threads", "1", "--no-progress",
                                        "--no-plot", "--quiet", "--overwrite"]


def _eval_cmd(d: str) -> list:
    return [sys.executable, "-m", "awpfast.evaluate", os.path.join(d, "last.pt"), "--split", "heldout",
            "--steps", "20", "--autoattack", "torchattacks", "--device", "cpu", "--json",
            os.path.join(d, "final_eval.json")]


def _job(arm: str, seed: int, runs: str) -> None:
    """One run, start to finish, in this process's children: train (or resume), record, evaluate."""
    d = _dir(runs, arm, seed)
    os.makedirs(d, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    state = _state(d)
    if state in ("new", "started"):
        rec = {"arm": arm, "seed": seed, "cpu_model": _cpu_model(), "cpu_flags": _cpu_flags(),
               "cpu_count": os.cpu_count(), "hostname": platform.node(), "python": platform.python_version(),
               "commit": _commit(), "load_start": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "resumed_from_epoch": None}
        import torch
        rec["torch"] = torch.__version__
        if state == "started":
            rec["resumed_from_epoch"] = int(torch.load(os.path.join(d, "last.pt"), map_location="cpu",
                                                       weights_only=False)["epoch"])
        cmd = _train_cmd(arm, seed, d, resume=state == "started")
        rec["command"] = " ".join(cmd[1:])
        t0 = time.time()
        with open(os.path.join(d, "train.log"), "a") as log:
            r = subprocess.run(["nice", "-n", "19"] + cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise SystemExit(f"{arm} seed {seed}: training exited {r.returncode} (see {d}/train.log)")
        rec.update(wall_s=time.time() - t0, load_end=os.getloadavg(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        with open(os.path.join(d, "study_run.json"), "w") as f:
            json.dump(rec, f, indent=1)
    if _state(d) == "trained":
        t0 = time.time()
        with open(os.path.join(d, "eval.log"), "a") as log:
            r = subprocess.run(["nice", "-n", "19"] + _eval_cmd(d), cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise SystemExit(f"{arm} seed {seed}: evaluation exited {r.returncode} (see {d}/eval.log)")
        with open(os.path.join(d, "study_run.json")) as f:
            rec = json.load(f)
        rec.update(eval_wall_s=time.time() - t0, eval_load_end=os.getloadavg())
        with open(os.path.join(d, "study_run.json"), "w") as f:
            json.dump(rec, f, indent=1)


def plan(seeds, arms) -> list:
    """(arm, seed) in seed-major order; a pilot arm only for its first seeds."""
    out = []
    for s in seeds:
        for a in arms:
            if a in PILOT and s not in sorted(seeds)[:PILOT[a]]:
                continue
            out.append((a, s))
    return out


def launch(seeds, arms, jobs: int, runs: str) -> None:
    """Run the plan with ``jobs`` worker processes (each ``study.py _job ARM SEED``)."""
    todo = [(a, s) for a, s in plan(seeds, arms) if _state(_dir(runs, a, s)) != "done"]
    running = []
    lock = _take_lock(runs)
    try:
        while todo or running:
            while todo and len(running) < jobs:
                a, s = todo.pop(0)
                cmd = [sys.executable, os.path.abspath(__file__), "_job", a, str(s), "--runs", runs]
                print(f"{time.strftime('%H:%M:%S')} start {a} seed {s} ({_state(_dir(runs, a, s))})", flush=True)
                running.append((subprocess.Popen(cmd, cwd=ROOT), a, s, time.time()))
            time.sleep(5)
            for item in list(running):
                p, a, s, t0 = item
                if p.poll() is None:
                    continue
                running.remove(item)
                print(f"{time.strftime('%H:%M:%S')} {'done ' if p.returncode == 0 else 'FAILED'} {a} seed {s} "
                      f"in {(time.time() - t0) / 60:.1f} min (load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        os.remove(lock)


def _take_lock(runs: str) -> str:
    """One launcher per runs folder: a second is refused while the first lives."""
    os.makedirs(runs, exist_ok=True)
    path = os.path.join(runs, "launcher.lock")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
        try:
            os.kill(pid, 0)
            raise SystemExit(f"another study launcher (pid {pid}) runs on {runs}; wait for it or stop it")
        except ProcessLookupError:
            os.remove(path)  # a killed launcher's lock
            return _take_lock(runs)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return path


def status(seeds, arms, runs: str) -> None:
    counts = {}
    for a, s in plan(seeds, arms):
        st = _state(_dir(runs, a, s))
        counts.setdefault(a, {}).setdefault(st, []).append(s)
    for a, c in counts.items():
        print(f"{a:14s} " + "  ".join(f"{k}: {' '.join(map(str, v))}" for k, v in sorted(c.items())))


def parse_seeds(text: str) -> list:
    out = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += list(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "status", "_job"):
        c = sub.add_parser(name)
        if name == "_job":
            c.add_argument("arm", choices=list(ARMS))
            c.add_argument("seed", type=int)
        else:
            c.add_argument("--seeds", default="0-9", help="e.g. 0-9 or 0,1,2")
            c.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
        c.add_argument("--runs", default=RUNS)
        if name == "run":
            c.add_argument("--jobs", type=int, default=2)
    a = p.parse_args(argv)
    if a.cmd == "_job":
        _job(a.arm, a.seed, a.runs)
    elif a.cmd == "run":
        launch(parse_seeds(a.seeds), a.arms, a.jobs, a.runs)
    elif a.cmd == "status":
        status(parse_seeds(a.seeds), a.arms, a.runs)


if __name__ == "__main__":
    main()
