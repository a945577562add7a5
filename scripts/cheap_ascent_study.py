"""The cheap AWP ascents in the robust-overfitting regime of docs/reproduction.md (issue 18).

Arms (``scripts/explore_regime.py`` candidates, 200 epochs, evaluation every 5 epochs):
AT (``n320-e15-n20-long``), AT-AWP g0.01 with its separate ascent (``long-awp0.01``), the
direction from the training attack's last step (``long-awp0.01-attack``), and the separate
ascent every 2 / 4 steps (``long-awp0.01-every2`` / ``-every4``); when run, the eval-mode
attack pair (``long-awp0.01-evalbn``, exact, and ``long-awp0.01-evalbn-attack``).

    python scripts/explore_regime.py run long-awp0.01-attack long-awp0.01-every2 ... --seeds 0 1 2
    python scripts/cheap_ascent_study.py autoattack          # AutoAttack (torchattacks) on each final checkpoint
    python scripts/cheap_ascent_study.py cost                # CPU seconds per AWP epoch of each arm, interleaved
    python scripts/cheap_ascent_study.py table               # markdown, docs/reproduction_cheap_ascent.{json,png}

Per arm and seed: last-epoch and best test PGD-20 (metrics.jsonl), AutoAttack and PGD-20 of
``last.pt`` (``python -m awpfast.evaluate --autoattack torchattacks --steps 20``), the paired
differences (same seed) to AT-AWP separate and to AT with their t statistics, and the wall
time per training epoch while AWP is on (epochs 11-200), next to the CPU time measured by ``cost``.
A cheap arm *keeps the gain* when its mean paired difference to AT-AWP separate is >= -1.0 point
for both last-epoch PGD-20 and AutoAttack, and its paired gain over AT is significant
(two-sided t test, 5 %).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import explore_regime as E  # noqa: E402

ARMS = {"AT": "n320-e15-n20-long", "AT-AWP separate": "long-awp0.01", "attack-sourced": "long-awp0.01-attack",
        "every 2": "long-awp0.01-every2", "every 4": "long-awp0.01-every4",
        "AT-AWP separate, eval-mode attack": "long-awp0.01-evalbn",
        "attack-sourced, eval-mode attack": "long-awp0.01-evalbn-attack"}
EXACT = {"attack-sourced, eval-mode attack": "AT-AWP separate, eval-mode attack"}  # else "AT-AWP separate"
AWP_FROM = 10   # AWP warm-up: epochs 1-10 run without it (the cost is AT's there)
T_CRIT = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # two-sided 5 %
OUT = os.path.join(ROOT, "docs", "reproduction_cheap_ascent")


def _dir(runs, name, seed):
    return os.path.join(runs, f"{name}-s{seed}")


def _done(d):
    return os.path.isfile(os.path.join(d, "done.json"))


def autoattack(runs, seeds, names) -> None:
    """AutoAttack (torchattacks, standard) and PGD-20 on the final checkpoint of every finished run
    (skipped when its aa_last.json exists); one process at a time, nice 19, one thread."""
    for name in names:
        for seed in seeds:
            d = _dir(runs, name, seed)
            out = os.path.join(d, "aa_last.json")
            if not _done(d) or os.path.isfile(out):
                continue
            try:  # a second worker may be evaluating it
                os.close(os.open(out + ".lock", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                continue
            t0 = time.time()
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
            try:
                subprocess.run(["nice", "-n", "19", sys.executable, "-m", "awpfast.evaluate", os.path.join(d, "last.pt"),
                                "--autoattack", "torchattacks", "--steps", "20", "--device", "cpu", "--json", out],
                               check=True, env=env, stdout=subprocess.DEVNULL)
            finally:
                os.remove(out + ".lock")
            with open(out) as f:
                r = json.load(f)
            print(f"{name} s{seed}: PGD-20 {100 * r['pgd20_acc']:.1f}  AutoAttack {100 * r['autoattack_acc']:.1f}  "
                  f"({time.time() - t0:.0f} s)", flush=True)


def cost(names, reps: int, out: str) -> dict:
    """CPU seconds (``time.process_time``, one thread) of one training epoch with AWP on (gamma 0.01,
    full eps; epoch 20 of the schedule) for each arm, the arms interleaved ``reps`` times; median."""
    import tempfile

    import torch

    import awpfast.train as T
    from awpfast.train import loop
    torch.set_num_threads(1)
    trainers = {}
    for name in names:
        args = T.build_parser().parse_args(E.CANDIDATES[name] + ["--out", tempfile.mkdtemp(), "--threads", "1",
                                                                  "--no-progress", "--quiet", "--no-plot"])
        trainers[name] = loop.setup(T.make_config(args))
    times = {n: [] for n in names}
    for _ in range(reps):
        for name, t in trainers.items():
            c0 = time.process_time()
            loop.train_epoch(t, 20)
            times[name].append(time.process_time() - c0)
    res = {"reps": reps, "steps_per_epoch": next(iter(trainers.values())).n_iter, "load_before": os.getloadavg(),
           "cpu_s_per_epoch": {n: sorted(v)[len(v) // 2] for n, v in times.items()}, "all": times}
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    for n, v in res["cpu_s_per_epoch"].items():
        print(f"{n}: {v:.3f} CPU s per epoch (median of {reps})")
    return res


def _ms(vals):
    """explore_regime's mean/sd summary, plus the one-sample t."""
    out = E._ms(vals)
    if out is None:
        return None
    m, sd = out["mean"], out["std"]
    if out["n"] > 1:
        out["t"] = m / (sd / out["n"] ** 0.5) if sd > 0 else (math.inf if m else 0.0)
    return out


def per_run(d) -> dict:
    h = E.load(d)
    ev = [r for r in h if not math.isnan(r["test_robust_acc"])]
    awp_epochs = [r for r in h if r["epoch"] > AWP_FROM]
    row = {"last_pgd20": 100 * ev[-1]["test_robust_acc"], "best_pgd20": 100 * max(r["test_robust_acc"] for r in ev),
           "best_epoch": max(ev, key=lambda r: r["test_robust_acc"])["epoch"],
           "last_clean": 100 * ev[-1]["test_clean_acc"],
           "robust_gap": 100 * (ev[-1]["train_robust_acc"] - ev[-1]["test_robust_acc"]),
           "train_s_per_awp_epoch": sum(r["train_time_s"] for r in awp_epochs) / len(awp_epochs),
           "train_s_total": sum(r["train_time_s"] for r in h)}
    with open(os.path.join(d, "done.json")) as f:
        row["load_at_end"] = json.load(f).get("load_at_end")
    aa = os.path.join(d, "aa_last.json")
    if os.path.isfile(aa):
        with open(aa) as f:
            r = json.load(f)
        row.update(autoattack=100 * r["autoattack_acc"], final_pgd20=100 * r["pgd20_acc"], aa_n=r["n"],
                   aa_impl=r.get("autoattack"))
    return row


KEYS = ("last_pgd20", "autoattack", "best_pgd20", "last_clean", "robust_gap", "train_s_per_awp_epoch")


def table(runs, seeds, out_prefix, cost_file) -> dict:
    per = {}
    for arm, name in ARMS.items():
        rows = {s: per_run(_dir(runs, name, s)) for s in seeds if _done(_dir(runs, name, s))}
        if rows:
            per[arm] = rows
    summary = {}
    for arm, rows in per.items():
        summary[arm] = {k: _ms([r.get(k) for r in rows.values()]) for k in KEYS}
        for base_key, base in (("vs_exact", EXACT.get(arm, "AT-AWP separate")), ("vs_AT", "AT")):
            if arm == base or base not in per or (base_key == "vs_exact" and arm in ("AT", *EXACT.values())):
                continue
            summary[arm][base_key] = {"base": base}
            for k in ("last_pgd20", "autoattack", "best_pgd20"):
                diffs = [rows[s][k] - per[base][s][k] for s in rows
                         if s in per[base] and rows[s].get(k) is not None and per[base][s].get(k) is not None]
                summary[arm][base_key][k] = _ms(diffs)
    cheap = [a for a in summary if a not in ("AT",) and a not in EXACT.values() and a != "AT-AWP separate"]
    for arm in cheap:
        ve, va = summary[arm].get("vs_exact", {}), summary[arm].get("vs_AT", {})
        within = all(ve.get(k) and ve[k]["mean"] >= -1.0 for k in ("last_pgd20", "autoattack"))
        sig = all(va.get(k) and va[k]["n"] > 1 and va[k]["mean"] > 0 and va[k]["t"] > T_CRIT[va[k]["n"] - 1]
                  for k in ("last_pgd20", "autoattack"))
        enough = all(ve.get(k) and va.get(k) and va[k]["n"] > 1 for k in ("last_pgd20", "autoattack"))
        summary[arm]["keeps_gain"] = bool(within and sig) if enough else None  # None: too few seeds to decide
        summary[arm]["within_1pt_of_exact"], summary[arm]["beats_AT_significantly"] = within, sig
    partial = at_common_epoch(runs, seeds)
    cpu = None
    if cost_file and os.path.isfile(cost_file):
        with open(cost_file) as f:
            cpu = json.load(f)
    result = {"regime": E.CANDIDATES["n320-e15-n20-long"], "arms": {a: E.CANDIDATES[n] for a, n in ARMS.items()},
              "eval_every": 5, "seeds": seeds, "criterion": "keeps the gain: mean paired difference to the exact "
              "arm >= -1.0 point on last-epoch test PGD-20 and on AutoAttack of last.pt, and paired gain over AT "
              "significant (two-sided t, 5 %) on both", "summary": summary,
              "runs": {a: {str(s): r for s, r in rows.items()} for a, rows in per.items()}, "cpu_cost": cpu,
              "at_common_epoch": partial}
    with open(out_prefix + ".json", "w") as f:
        json.dump(result, f, indent=1)
    _print(summary, seeds, cpu)
    _plot(summary, cpu, out_prefix + ".png")
    return result


def at_common_epoch(runs, seeds) -> dict:
    """Test PGD-20 at the latest evaluated epoch that every started run (finished or not) has reached,
    per arm and seed, and the paired differences to exact AT-AWP and to AT there: the comparison
    that includes runs still going at a deadline (clearly not the last epoch)."""
    curves = {}
    for arm, name in ARMS.items():
        for s in seeds:
            d = _dir(runs, name, s)
            if os.path.isfile(os.path.join(d, "metrics.jsonl")):
                curves.setdefault(arm, {})[s] = {r["epoch"]: 100 * r["test_robust_acc"] for r in E.load(d)
                                                  if not math.isnan(r["test_robust_acc"])}
    reached = [max(c) for rows in curves.values() for c in rows.values() if c]
    if not reached:
        return {}
    ep = min(reached)
    out = {"epoch": ep, "pgd20": {a: {str(s): c.get(ep) for s, c in rows.items()} for a, rows in curves.items()}}
    for arm, rows in curves.items():
        for key, base in (("vs_exact", EXACT.get(arm, "AT-AWP separate")), ("vs_AT", "AT")):
            if arm == base or base not in curves or (key == "vs_exact" and arm in ("AT", *EXACT.values())):
                continue
            diffs = [rows[s][ep] - curves[base][s][ep] for s in rows if s in curves[base]]
            out.setdefault("paired", {}).setdefault(arm, {})[key] = dict(_ms(diffs), base=base)
    f = lambda m: f"{m['mean']:.1f} ± {m['std']:.1f} (n={m['n']}" + (f", t {m['t']:.1f})" if "t" in m else ")")  # noqa
    print(f"\nat epoch {ep} (every started run has reached it):")
    for arm, d in out.get("paired", {}).items():
        print(f"  {arm}: " + "; ".join(f"− {v['base']} {f(v)}" for v in d.values()))
    return out


def markdown(summary, seeds, cpu) -> str:
    """The study's two tables as markdown (docs/reproduction.md's `cheap-ascent` numbers block)."""
    out = []
    line = out.append
    f = lambda m: "–" if not m else f"{m['mean']:.1f} ± {m['std']:.1f}"  # noqa: E731
    ft = lambda m: "–" if not m or "t" not in m else f"{m['t']:.1f}"  # noqa: E731
    line(f"| arm (seeds {' '.join(map(str, seeds))}) | n | last PGD-20 | AutoAttack | best PGD-20 | last clean | "
          "robust gap | wall s / AWP epoch | CPU s / AWP epoch |")
    line("|---|---|---|---|---|---|---|---|---|")
    for arm, s in summary.items():
        c = cpu["cpu_s_per_epoch"].get(ARMS[arm]) if cpu else None
        line(f"| {arm} | {s['last_pgd20']['n']} | {f(s['last_pgd20'])} | {f(s['autoattack'])} | {f(s['best_pgd20'])} | "
              f"{f(s['last_clean'])} | {f(s['robust_gap'])} | {f(s['train_s_per_awp_epoch'])} | "
              f"{'–' if c is None else f'{c:.2f}'} |")
    line("")
    line("| arm − base (paired by seed) | last PGD-20 | t | AutoAttack | t | best PGD-20 | t | keeps the gain |")
    line("|---|---|---|---|---|---|---|---|")
    for arm, s in summary.items():
        for key in ("vs_exact", "vs_AT"):
            if key not in s:
                continue
            d = s[key]
            keep = {True: "yes", False: "no", None: "not decided (too few seeds with AutoAttack)"}[
                s.get("keeps_gain")] if key == "vs_exact" else ""
            line(f"| {arm} − {d['base']} | {f(d['last_pgd20'])} | {ft(d['last_pgd20'])} | {f(d['autoattack'])} | "
                  f"{ft(d['autoattack'])} | {f(d['best_pgd20'])} | {ft(d['best_pgd20'])} | {keep or ''} |")
    return "\n".join(out)


def _print(summary, seeds, cpu) -> None:
    print(markdown(summary, seeds, cpu))


def _plot(summary, cpu, path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (arm, s) in enumerate(summary.items()):
        x = cpu["cpu_s_per_epoch"].get(ARMS[arm]) if cpu else None
        if x is None:
            x = s["train_s_per_awp_epoch"]["mean"]
        for k, marker in (("last_pgd20", "o"), ("autoattack", "s")):
            m = s.get(k)
            if not m:
                continue
            ax.errorbar([x], [m["mean"]], yerr=[m["std"]], fmt=marker, color=f"C{i}",
                        label=arm if k == "last_pgd20" else None, capsize=3)
    ax.set_xlabel("CPU seconds per training epoch with AWP on" if cpu else "wall seconds per training epoch")
    ax.set_ylabel("test robust accuracy, last epoch (%)\n● PGD-20   ■ AutoAttack")
    ax.set_title("cheap AWP ascents: robust accuracy against cost (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cmd", choices=("autoattack", "cost", "table"))
    p.add_argument("--runs", default=E.RUNS, help="the runs folder (default: runs/explore)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=OUT)
    a = p.parse_args(argv)
    names = [ARMS[x] for x in a.arms]
    if a.cmd == "autoattack":
        autoattack(a.runs, a.seeds, names)
    elif a.cmd == "cost":
        cost(names, a.reps, a.out + "_cost.json")
    else:
        table(a.runs, a.seeds, a.out, a.out + "_cost.json")


if __name__ == "__main__":
    main()
