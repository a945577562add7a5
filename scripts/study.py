"""The study that decides which cheap AWP ascent keeps AWP's gain: arms paired by seed, verdicts computed.

The regime (docs/reproduction.md): scikit-learn's digits at 8x8, SmallCNN-32, 320 training images
with 20 % symmetric label noise, a train-mode PGD-10 attack (eps 0.15, ramped over 10 epochs),
200 epochs, LR 0.05 piecewise, batch 32; AWP (gamma 0.01) from epoch 11. Every run is the plain
``awpfast-train`` command (validation PGD-20 every epoch, test PGD-20 every 5 epochs and at every
new validation best), then ``python -m awpfast.evaluate`` of its ``last.pt``: PGD-20 on every held-out
image (the 500 test images and the 877 training images the run never used: 1377), and AutoAttack
(torchattacks, standard) on the 500 test images (on all 1377 it took about three times as long: the
study's CPU budget decided; the paired differences between arms use the same images).

    python scripts/study.py run --seeds 0-9 --jobs 2       # resumable: finished runs are skipped,
                                                           # killed ones resume from their last.pt
    python scripts/study.py status                         # what is done, running, left
    python scripts/study.py cost --model small-cnn         # CPU time of a training step per arm
    python scripts/study.py cost --model preact18
    python scripts/study.py table                          # docs/study.json; prints the tables

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
seeds the observed mean and spread would need. A verdict is final at SEEDS (10) paired seeds; before
that it is worded "so far (n of 10 seeds)" (an interim look). A pilot is judged by its promotion rule
(within 2 points of exact AWP on both deciding metrics), the equivalence rule's outcome beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
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
    "rwp": _AWP + ["--awp-rule", "rwp"],
}
LABELS = {"AT": "AT", "AWP": "exact AT-AWP (gamma 0.01)", "attack": "attack-sourced",
          "AWP-evalbn": "exact AT-AWP, eval-mode attack", "attack-evalbn": "attack-sourced, eval-mode attack",
          "every2": "every 2 steps", "sub0.25": "sub-batch 0.25", "momentum": "momentum-sourced (pilot)",
          "rwp": "RWP (gamma 0.01, 10 passes; 3 seeds: reported, not concluded)"}
EXACT = {"attack-evalbn": "AWP-evalbn"}          # the exact arm a cheap arm is judged against (else "AWP")
CHEAP = ("attack", "attack-evalbn", "every2", "sub0.25", "momentum")
PILOT = {"momentum": 3, "rwp": 3}                # seeds of a pilot / report-only arm, unless promoted
REPORTED = {"rwp": "AWP"}                         # arms compared with another arm, without a verdict
SEEDS = 10                                        # paired seeds per arm before a verdict is final (design 13)
PROMOTE = -2.0                                    # a pilot is promoted when it ends within 2 points of exact AWP
MARGIN = 1.0                                      # points of accuracy
AWP_FROM = 10                                     # epochs 1-10 train without AWP
CHANCE = 20.0                                     # clean accuracy (%) at or below which a run is at chance (10 classes)


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
    """The CPU's model name (the benchmarks' reader, benchmarks/_bench_io.py)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("awpfast_bench_io", os.path.join(ROOT, "benchmarks", "_bench_io.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.cpu_name()


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


RECORDS = os.path.join(ROOT, "docs", "study", "records")  # one committed JSON per finished run


def _record_path(arm: str, seed: int, records: str = RECORDS) -> str:
    return os.path.join(records, f"{arm}-s{seed}.json")


def _state(d: str) -> str:
    """done (trained and evaluated, or its record committed), trained (evaluation left), started
    (resumable), new."""
    name = os.path.basename(d)
    if os.path.isfile(os.path.join(d, "final_eval.json")) or os.path.isfile(os.path.join(RECORDS, name + ".json")):
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


def _eval_cmds(d: str) -> list:
    """``[(name, command)]``: PGD-20 on every held-out image; AutoAttack (and PGD-20) on the test split."""
    base = [sys.executable, "-m", "awpfast.evaluate", os.path.join(d, "last.pt"), "--device", "cpu", "--overwrite"]
    return [("heldout", base + ["--split", "heldout", "--steps", "20", "--autoattack", "off", "--json",
                                os.path.join(d, "eval_heldout.json")]),
            ("test", base + ["--split", "test", "--steps", "20", "--autoattack", "torchattacks", "--json",
                             os.path.join(d, "eval_test.json")])]


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
        final = {}
        for name, cmd in _eval_cmds(d):
            out = cmd[-1]
            if not os.path.isfile(out):
                with open(os.path.join(d, "eval.log"), "a") as log:
                    r = subprocess.run(["nice", "-n", "19"] + cmd, cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
                if r.returncode != 0:
                    raise SystemExit(f"{arm} seed {seed}: evaluation exited {r.returncode} (see {d}/eval.log)")
            with open(out) as f:
                final[name] = json.load(f)
        with open(os.path.join(d, "study_run.json")) as f:
            rec = json.load(f)
        rec.update(eval_wall_s=time.time() - t0, eval_load_end=os.getloadavg())
        with open(os.path.join(d, "study_run.json"), "w") as f:
            json.dump(rec, f, indent=1)
        with open(os.path.join(d, "final_eval.json"), "w") as f:  # the commit point of a finished run
            json.dump(final, f, indent=1)


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


def status(seeds, arms, runs: str, jobs: int = 2) -> None:
    """Each arm's seeds by state, then the runs left and a rough wall-clock estimate: each arm's median
    wall time over its finished runs that ran in one go (training and final evaluation, as recorded),
    summed and divided by ``jobs``; an arm with no such run counts at the median over all arms."""
    counts, walls = {}, {}
    for a, s in plan(seeds, arms):
        d = _dir(runs, a, s)
        st = _state(d)
        counts.setdefault(a, {}).setdefault(st, []).append(s)
        try:
            with open(os.path.join(d, "study_run.json")) as f:
                m = json.load(f)
            if st == "done" and m.get("wall_s") is not None and m.get("resumed_from_epoch") is None:
                # (a resumed run's wall_s covers its last sitting only)
                walls.setdefault(a, []).append(m["wall_s"] + (m.get("eval_wall_s") or 0.0))
        except (OSError, ValueError):
            pass
    for a, c in counts.items():
        print(f"{a:14s} " + "  ".join(f"{k}: {' '.join(map(str, v))}" for k, v in sorted(c.items())))
    left = {a: sum(len(v) for k, v in c.items() if k != "done") for a, c in counts.items()}
    total = sum(len(v) for c in counts.values() for v in c.values())
    every = statistics.median([w for v in walls.values() for w in v]) if walls else None
    est = None if every is None else sum(n * (statistics.median(walls[a]) if a in walls else every)
                                         for a, n in left.items()) / max(1, jobs)
    print(f"{total - sum(left.values())} of {total} runs done, {sum(left.values())} left"
          + ("" if est is None else f"; about {est / 3600:.1f} h more at --jobs {jobs} "
                                    "(each arm's median wall time so far; the machine's load moves it)"))


# ----------------------------------------------------------------------------- records
_KEEP = ("epoch", "lr", "awp_gamma", "train_loss", "train_adv_acc", "train_time_s", "val_clean_acc", "val_robust_acc",
         "test_clean_acc", "test_robust_acc", "train_clean_acc", "train_robust_acc", "awp_cosine",
         "awp_cosine_mean", "awp_cosine_samples")


def _r6(v):
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, list):
        return [_r6(x) for x in v]
    return v


def collect(runs: str, records: str = RECORDS) -> list:
    """Write the committed record of every finished run in ``runs`` that has none yet: its options,
    machine, per-epoch history (the keys of ``_KEEP``), the selected best epoch and the final
    evaluation. Returns the records written."""
    import torch
    os.makedirs(records, exist_ok=True)
    written = []
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        d = os.path.join(runs, name)
        out = os.path.join(records, name + ".json")
        if os.path.isfile(out) or not os.path.isfile(os.path.join(d, "final_eval.json")):
            continue
        with open(os.path.join(d, "study_run.json")) as f:
            machine = json.load(f)
        with open(os.path.join(d, "final_eval.json")) as f:
            final = json.load(f)
        with open(os.path.join(d, "metrics.jsonl")) as f:
            hist = [{k: _r6(r.get(k)) for k in _KEEP if k in r} for r in map(json.loads, f)]
        ck = torch.load(os.path.join(d, "last.pt"), map_location="cpu", weights_only=False)
        rec = {"arm": machine["arm"], "seed": machine["seed"], "machine": machine, "options": ARMS[machine["arm"]],
               "regime": REGIME, "best": ck["best"],
               "final_eval": {name: {k: ev.get(k) for k in ("split", "n", "clean_acc", "pgd20_acc", "autoattack_acc",
                                                            "autoattack", "seed", "time_s", "versions")}
                              for name, ev in final.items()},
               "history": hist}
        with open(out, "w") as f:
            json.dump(rec, f, separators=(",", ":"))
        written.append(out)
    return written


def load_records(records: str = RECORDS) -> dict:
    """``{arm: {seed: record}}`` of the committed records."""
    out = {}
    for f in sorted(os.listdir(records)) if os.path.isdir(records) else []:
        if f.endswith(".json"):
            with open(os.path.join(records, f)) as fh:
                r = json.load(fh)
            out.setdefault(r["arm"], {})[int(r["seed"])] = r
    return out


def run_metrics(rec: dict) -> dict:
    """One run's numbers (percent): last-epoch test PGD-20, the mean of the last 3 scheduled test
    evaluations, the validation-selected epoch's test PGD-20, the final checkpoint's PGD-20 and
    AutoAttack on every held-out image, the mean cosine to the exact direction by phase, the
    training seconds per epoch with AWP on."""
    h = rec["history"]
    epochs = len(h)
    sched = [r for r in h if r.get("test_robust_acc") is not None and (r["epoch"] % 5 == 0 or r["epoch"] == epochs)]
    best = rec["best"]
    fe = rec["final_eval"]
    cos = [(r["epoch"], r["awp_cosine_mean"]) for r in h if r.get("awp_cosine_mean") is not None]

    def phase(lo, hi):
        v = [c for e, c in cos if lo < e <= hi]
        return sum(v) / len(v) if v else None
    awp = [r["train_time_s"] for r in h if r["epoch"] > AWP_FROM]
    onset = [r["val_clean_acc"] for r in h if AWP_FROM < r["epoch"] <= AWP_FROM + 10 and r.get("val_clean_acc") is not None]
    chance_from = None
    if 100 * h[-1]["test_clean_acc"] <= CHANCE:  # ended at chance: from which epoch on validation stayed there
        for r in reversed(h):
            if r.get("val_clean_acc") is not None and 100 * r["val_clean_acc"] > CHANCE:
                break
            chance_from = r["epoch"]
    return {"last_pgd20": 100 * h[-1]["test_robust_acc"], "last3_pgd20": 100 * sum(r["test_robust_acc"]
                                                                                    for r in sched[-3:]) / 3,
            "best_val_epoch": best.get("epoch"), "best_val_test_pgd20": 100 * best["test_robust_acc"],
            "heldout_pgd20": 100 * fe["heldout"]["pgd20_acc"], "heldout_n": fe["heldout"]["n"],
            "autoattack": None if fe["test"].get("autoattack_acc") is None else 100 * fe["test"]["autoattack_acc"],
            "last_clean": 100 * h[-1]["test_clean_acc"],
            "cosine": phase(0, epochs), "cosine_by_phase": {"11-100": phase(AWP_FROM, epochs // 2),
                                                            "101-150": phase(epochs // 2, 3 * epochs // 4),
                                                            "151-200": phase(3 * epochs // 4, epochs)},
            "onset_val_clean_min": 100 * min(onset) if onset else None, "chance_from": chance_from,
            "train_s_per_awp_epoch": sum(awp) / len(awp), "cpu_model": rec["machine"].get("cpu_model"),
            "torch": rec["machine"].get("torch")}


METRICS = ("last3_pgd20", "autoattack", "last_pgd20", "heldout_pgd20", "best_val_test_pgd20", "last_clean")
DECIDING = ("last3_pgd20", "autoattack")


def _paired(per, arm, base, key):
    """Paired differences ``arm - base`` over the seeds both have, on one machine (CPU model and torch)."""
    a, b = per.get(arm, {}), per.get(base, {})
    seeds = sorted(s for s in a if s in b and a[s][key] is not None and b[s][key] is not None
                   and (a[s]["cpu_model"], a[s]["torch"]) == (b[s]["cpu_model"], b[s]["torch"]))
    out = paired([a[s][key] - b[s][key] for s in seeds])
    if out:
        out["seeds"] = seeds
    return out


def summarize(records: str = RECORDS) -> dict:
    """Per arm: mean / s.d. of every metric; per AWP arm: paired differences to AT; per cheap arm: paired
    differences to its exact arm and the verdict (computed, never typed), with the cosines next to it."""
    recs = load_records(records)
    per = {arm: {s: run_metrics(r) for s, r in rows.items()} for arm, rows in recs.items()}
    out = {"regime": REGIME, "arms": {}, "margin_points": MARGIN, "criterion": __doc__.split("Verdicts")[1].strip()}
    for arm in ARMS:
        if arm not in per:
            continue
        rows = per[arm]
        entry = {"label": LABELS[arm], "options": ARMS[arm], "seeds": sorted(rows),
                 "machines": sorted({f"{r['cpu_model']} / torch {r['torch']}" for r in rows.values()}),
                 "metrics": {k: paired([r[k] for r in rows.values() if r[k] is not None])
                             for k in METRICS + ("cosine", "onset_val_clean_min", "train_s_per_awp_epoch")},
                 "at_chance": {str(s): r["chance_from"] for s, r in sorted(rows.items()) if r["chance_from"]},
                 "cosine_by_phase": {ph: paired([r["cosine_by_phase"][ph] for r in rows.values()
                                                 if r["cosine_by_phase"][ph] is not None])
                                     for ph in ("11-100", "101-150", "151-200")},
                 "per_seed": {str(s): {k: r[k] for k in METRICS + ("best_val_epoch", "cosine", "onset_val_clean_min",
                                                                   "chance_from")} for s, r in
                              sorted(rows.items())}}
        if arm != "AT":
            entry["vs_AT"] = {k: _paired(per, arm, "AT", k) for k in METRICS}
        if arm in REPORTED:
            entry["vs_exact"] = dict({k: _paired(per, arm, REPORTED[arm], k) for k in METRICS}, base=REPORTED[arm])
        if arm in CHEAP:
            exact = EXACT.get(arm, "AWP")
            entry["vs_exact"] = dict({k: _paired(per, arm, exact, k) for k in METRICS}, base=exact)
            entry["verdict"] = verdict(entry["vs_exact"], entry["vs_AT"], pilot=arm in PILOT)
        out["arms"][arm] = entry
    return out


def verdict(vs_exact: dict, vs_at: dict, pilot: bool = False) -> dict:
    """keeps / loses / undecided (design brief section 13) from the paired differences on DECIDING, with ``n``
    (the paired seeds it rests on), ``final`` (``n`` >= SEEDS and not a pilot: before that the rule's outcome is
    an interim look, not a verdict) and, for a pilot, ``pilot_promotion`` (it ends within 2 points of exact AWP
    on both deciding metrics)."""
    ds = [vs_exact.get(k) for k in DECIDING]
    gs = [vs_at.get(k) for k in DECIDING]
    n = min((d["n"] for d in ds if d), default=0) if all(ds) else 0
    tail = {"n": n, "final": n >= SEEDS and not pilot,
            "pilot_promotion": (all(d["mean"] >= PROMOTE for d in ds) if pilot and n else None)}
    if any(d is None or d["n"] < 2 for d in ds):
        return dict({"verdict": "undecided", "why": "fewer than 2 paired seeds on a deciding metric",
                     "seeds_needed": None}, **tail)
    keeps = all(d["ci90"][0] >= -MARGIN for d in ds) and all(g and g["n"] > 1 and g["ci95"][0] > 0 for g in gs)
    loses = any(d["ci95"][1] < -MARGIN for d in ds)
    if keeps:
        return dict({"verdict": "keeps the gain", "why": "90 % lower bounds >= -1 point on both, gain over AT "
                     "significant", "seeds_needed": None}, **tail)
    if loses:
        k = next(k for k, d in zip(DECIDING, ds) if d["ci95"][1] < -MARGIN)
        return dict({"verdict": "loses", "why": f"95 % upper bound below -1 point on {k}", "seeds_needed": None},
                    **tail)
    need = [seeds_needed(d["mean"], d["sd"]) for d in ds]
    return dict({"verdict": "undecided", "why": "neither bound clears the margin",
                 "seeds_needed": None if any(v is None for v in need) else max(need)}, **tail)


def verdict_words(v: dict) -> str:
    """The verdict as the docs, the README and ``--help`` word it: final at SEEDS paired seeds; before that
    "so far (n of SEEDS seeds)"; a pilot by its promotion rule, with the equivalence rule's outcome beside it."""
    n = v.get("n", 0)
    need = v.get("seeds_needed")
    if v.get("pilot_promotion") is not None:
        move = (f"within 2 points of exact AWP: promote it to {SEEDS} seeds" if v["pilot_promotion"] else
                "more than 2 points below exact AWP, not promoted")
        return f"pilot, {n} seed{'s' * (n != 1)}: {move} (the rule at n = {n}: {v['verdict']})"
    if v.get("final"):
        return v["verdict"] + (f" (about {need} seeds would decide)" if v["verdict"] == "undecided" and need else "")
    return (f"{v['verdict']} so far ({n} of {SEEDS} seeds" +
            (f"; about {need} would decide" if v["verdict"] == "undecided" and need else "") + ")")


def markdown(summary: dict) -> str:
    """The study's tables: per arm (mean ± s.d. over seeds) and the verdicts."""
    def ms(m, nd=1):
        if not m:
            return "–"
        return f"{m['mean']:.{nd}f} ± {m['sd']:.{nd}f}" if "sd" in m else f"{m['mean']:.{nd}f}"

    def ci(m, level="ci95"):
        if not m:
            return "–"
        if level not in m:
            return f"{m['mean']:+.1f} (n = 1)"
        return f"{m['mean']:+.1f} [{m[level][0]:+.1f}, {m[level][1]:+.1f}]"
    lines = ["| arm | seeds | last-3 PGD-20 | AutoAttack (test) | last PGD-20 | held-out PGD-20 | "
             "val-selected PGD-20 | last clean | cosine to exact | lowest val clean, epochs "
             f"{AWP_FROM + 1}–{AWP_FROM + 10} | ended at chance | train s / AWP epoch |", "|" + "---|" * 12]
    for arm, e in summary["arms"].items():
        m = e["metrics"]
        ch = e.get("at_chance", {})
        chance = (f"{len(ch)} of {len(e['seeds'])}" + "".join(f"; seed {s}: from epoch {ep}" for s, ep in ch.items())
                  if ch else f"0 of {len(e['seeds'])}")
        lines.append(f"| {e['label']} | {len(e['seeds'])} | {ms(m['last3_pgd20'])} | {ms(m['autoattack'])} | "
                     f"{ms(m['last_pgd20'])} | {ms(m['heldout_pgd20'])} | {ms(m['best_val_test_pgd20'])} | "
                     f"{ms(m['last_clean'])} | {ms(m['cosine'], 2) if arm != 'AT' else '–'} | "
                     f"{ms(m['onset_val_clean_min'], 0)} | {chance} | {ms(m['train_s_per_awp_epoch'], 2)} |")
    lines += ["", "| arm | − | last-3 PGD-20, mean [95 % CI] | AutoAttack | vs AT: last-3 PGD-20 | vs AT: AutoAttack | "
              "verdict |", "|" + "---|" * 7]
    for arm, e in summary["arms"].items():
        if arm == "AT":
            continue
        ve, va = e.get("vs_exact"), e["vs_AT"]
        v = e.get("verdict")
        vt = "–" if not v else verdict_words(v)
        base = summary["arms"].get(ve["base"], {}).get("label", ve["base"]) if ve else "–"
        lines.append(f"| {e['label']} | {base if ve else '–'} | {ci(ve and ve['last3_pgd20'])} | "
                     f"{ci(ve and ve['autoattack'])} | {ci(va['last3_pgd20'])} | {ci(va['autoattack'])} | {vt} |")
    return "\n".join(lines)


def summary_json(records: str = None) -> str:
    """docs/study.json's text: the summary of the committed records (``scripts/docs_numbers.py`` writes it with
    the tables; ``make test`` fails while the committed file differs)."""
    return json.dumps(summarize(records or RECORDS), indent=1) + "\n"


def table(records: str, out_prefix: str) -> dict:
    text = summary_json(records)
    with open(out_prefix + ".json", "w") as f:
        f.write(text)
    summary = json.loads(text)
    print(markdown(summary))
    return summary


# ----------------------------------------------------------------------------- cost
COST_MODELS = {
    "small-cnn": REGIME,  # the study's own model and data
    "preact18": ["--data", "synthetic", "--image-size", "32", "--model", "preact18", "--method", "at",
                 "--batch-size", "16", "--attack-steps", "3", "--attack-bn", "train", "--epochs", "200",
                 "--awp-gamma", "0"],
}


def cost(model: str, reps: int, steps: int, arms, out: str) -> dict:
    """CPU seconds (``time.process_time``, one thread) of one training step of each arm, the arms
    interleaved ``reps`` times (``steps`` steps each, after one warm-up round), AWP on at gamma 0.01
    and the full eps; per arm the paired differences to AT of the same round: median, quartiles, and
    the median as a fraction of exact AWP's own extra."""
    import tempfile

    import torch

    from awpfast import train as T
    from awpfast.train import loop
    torch.set_num_threads(1)
    trainers = {}
    for arm in arms:
        argv = COST_MODELS[model] + ARMS[arm]
        if "--awp-cosine-every" in argv:  # the diagnostic's exact pass is not part of an arm's cost
            i = argv.index("--awp-cosine-every")
            del argv[i:i + 2]
        args = T.build_parser().parse_args(argv + ["--out", tempfile.mkdtemp(), "--threads", "1", "--quiet",
                                                   "--no-plot", "--awp-warmup", "0", "--eps-warmup", "0"])
        t = loop.setup(T.make_config(args))
        x, y = next(iter(t.batches))
        trainers[arm] = (t, x, y)
    times = {a: [] for a in arms}
    load_before = os.getloadavg()
    for r in range(reps + 1):
        for arm, (t, x, y) in trainers.items():
            c0 = time.process_time()
            for _ in range(steps):
                loop.train_step(t, x, y)
            if r:  # round 0 warms up (and gives the momentum arm its first buffer)
                times[arm].append((time.process_time() - c0) / steps)

    def q(v, p):
        v = sorted(v)
        k = (len(v) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)
    res = {"model": model, "reps": reps, "steps_per_rep": steps, "threads": 1, "cpu_model": _cpu_model(),
           "torch": torch.__version__, "load_before": load_before, "arms": {}}
    base = times.get("AT")
    extra_awp = None
    if base and "AWP" in times:
        extra_awp = q([a - b for a, b in zip(times["AWP"], base)], 0.5)
    for arm, v in times.items():
        e = {"median_s": q(v, 0.5), "q1_s": q(v, 0.25), "q3_s": q(v, 0.75), "all_s": v}
        if base and arm != "AT":
            d = [a - b for a, b in zip(v, base)]
            e["extra_vs_AT"] = {"median_s": q(d, 0.5), "q1_s": q(d, 0.25), "q3_s": q(d, 0.75)}
            if extra_awp:
                e["fraction_of_awp_extra"] = q(d, 0.5) / extra_awp
        res["arms"][arm] = e
    res["load_after"] = os.getloadavg()
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    for arm, e in res["arms"].items():
        fr = e.get("fraction_of_awp_extra")
        print(f"{arm:14s} {1e3 * e['median_s']:8.1f} ms/step" + (
            f"  extra over AT {1e3 * e['extra_vs_AT']['median_s']:7.1f} ms [IQR {1e3 * e['extra_vs_AT']['q1_s']:.1f}, "
            f"{1e3 * e['extra_vs_AT']['q3_s']:.1f}]" if "extra_vs_AT" in e else "")
              + (f" = {fr:.2f} of exact AWP's extra" if fr is not None else ""))
    return res


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
        if name in ("run", "status"):
            c.add_argument("--jobs", type=int, default=2)
    c = sub.add_parser("collect", help="commit-ready records of the finished runs (docs/study/records)")
    c.add_argument("--runs", default=RUNS)
    c = sub.add_parser("table", help="the summary, verdicts and tables from the committed records")
    c.add_argument("--out", default=OUT)
    c = sub.add_parser("cost", help="CPU time of a training step per arm, interleaved, one thread")
    c.add_argument("--model", choices=list(COST_MODELS), default="small-cnn")
    c.add_argument("--reps", type=int, default=9)
    c.add_argument("--steps", type=int, default=4, help="steps per arm and round (even: every 2 alternates)")
    c.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    c.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.cmd == "collect":
        for w in collect(a.runs):
            print("wrote", os.path.relpath(w, ROOT))
        return
    if a.cmd == "table":
        table(RECORDS, a.out)
        return
    if a.cmd == "cost":
        cost(a.model, a.reps, a.steps, a.arms, a.out or f"{OUT}_cost_{a.model}.json")
        return
    if a.cmd == "_job":
        _job(a.arm, a.seed, a.runs)
    elif a.cmd == "run":
        launch(parse_seeds(a.seeds), a.arms, a.jobs, a.runs)
    elif a.cmd == "status":
        status(parse_seeds(a.seeds), a.arms, a.runs, a.jobs)


if __name__ == "__main__":
    main()
