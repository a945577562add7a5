#!/usr/bin/env python
"""The numbers of docs/reproduction.md's tables, README.md's results table, the training-step
ladder of docs/performance.md and the measured sentences of ``awpfast-train --help``
(awpfast/train/measured.py, where the markers are Python comments: ``# numbers: NAME (FILES)`` and
``# /numbers``), generated from the committed JSON.

Each generated table sits between two markers::

    <!-- numbers: NAME (FILE.json[, FILE.json ...]) -->
    | ... the table ... |
    <!-- /numbers -->

``NAME`` is a key of :data:`BLOCKS`: a function of the JSON files that returns the table's text.
``python scripts/docs_numbers.py`` rewrites every block from its JSON; ``--check`` only compares
(exit 1 and a diff on a mismatch). ``tests/test_docs_numbers.py`` runs the check, and also checks
that every markdown table of docs/reproduction.md and the README's results table lies inside a
block, so that no number in them is typed by hand. A block whose NAME ends in ``-settings``
is a table of run settings written by hand: there every number must occur among the numbers of
its JSON (the run's options), checked the same way.

Rounding: the tables show what the JSON holds, rounded half-even by Python's format() to the
digits shown; means ± sample standard deviations (n - 1) over seeds; paired t = mean / (sd / sqrt n).
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import json
import math
import os
import re
import statistics
import sys
from typing import Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["docs/reproduction.md", "README.md", "docs/performance.md", "awpfast/train/measured.py"]
# a markdown block, or (in a generated Python module) the same markers as comments
START = re.compile(r"^(?:<!-- numbers: (?P<name>[\w.-]+) \((?P<files>[^)]*)\) -->"
                   r"|# numbers: (?P<pname>[\w.-]+) \((?P<pfiles>[^)]*)\))\s*$")
END = "<!-- /numbers -->"
PY_END = "# /numbers"


def load(path):
    with open(os.path.join(ROOT, path)) as f:
        return json.load(f)


def pm(mean, sd, nd=1):
    return f"{mean:.{nd}f} ± {sd:.{nd}f}"


def mean_sd_t(values):
    n = len(values)
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else float("nan")
    t = m / (sd / math.sqrt(n)) if n > 1 and sd > 0 else float("nan")
    return m, sd, t


def table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------- the regime study
SEEDS = ("0", "1", "2")
FIRST_LR_DECAY_FRACTION = 0.5  # the piecewise schedule: x0.1 at 50 % of the epochs


def regime_arms(files):
    d = load(files[0])
    rows = []
    for arm, t in d["table"].items():
        n = t["best"]["n"]
        rows.append([f"{arm} (n={n})"] + [pm(t[k]["mean"], t[k]["std"]) for k in
                                          ("best", "last", "drop", "tail_mean", "last_clean", "last_train_pgd", "gap")])
    return table(["arm (seeds 0 1 2)", "best test PGD-20", "last", "best − last", "mean last 4 evals", "last clean",
                  "last train PGD-20", "robust gap"], rows)


def regime_at_seeds(files):
    d = load(files[0])
    runs = d["runs"]["AT"]
    rows = []
    for s in SEEDS:
        r = runs[s]
        decay = int(r["epochs"] * FIRST_LR_DECAY_FRACTION)
        rows.append([s, r["best_epoch"], f"{r['best']:.1f}", f"{r['last']:.1f}", f"{r['drop']:.1f}",
                     f"{r['last_train_pgd']:.1f}", "yes" if r["best_epoch"] < decay else "no"])
    return table(["AT seed", "best epoch", "best test PGD-20", "last", "best − last", "last train PGD-20",
                  "best epoch before the first LR decay (epoch 100)"], rows)


def paired_best(d, arm):
    base = d["table"][arm]["paired_base"]
    diffs = [d["runs"][arm][s]["best"] - d["runs"][base][s]["best"] for s in SEEDS]
    return mean_sd_t(diffs)


def regime_paired(files):
    d = load(files[0])
    rows = []
    for arm, t in d["table"].items():
        base = t.get("paired_base")
        if not base:
            continue
        bm, bsd, bt = paired_best(d, arm)
        row = [f"{arm} − {base}", pm(bm, bsd), f"{bt:.2f}"]
        for k in ("paired_last_vs_base", "paired_tail_mean_vs_base", "paired_gap_vs_base"):
            row += [pm(t[k]["mean"], t[k]["std"]), f"{t[k]['t']:.2f}"]
        rows.append(row)
    return table(["arm − its base (paired by seed)", "best epoch", "t", "last", "t", "mean last 4 evals", "t",
                  "robust gap", "t"], rows)


def _corr(a, b):
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    sab = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return sab / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def flatness_stats(f):
    e, fl, g = [float(v) for v in f["epochs"]], f["flatness"], f["robust_gap"]
    r_fg, r_fe, r_ge = _corr(fl, g), _corr(fl, e), _corr(g, e)
    partial = (r_fg - r_fe * r_ge) / math.sqrt((1 - r_fe ** 2) * (1 - r_ge ** 2))
    dfl = [b - a for a, b in zip(fl, fl[1:])]
    dg = [b - a for a, b in zip(g, g[1:])]
    return {"n": len(e), "pearson": r_fg, "r_flatness_epoch": r_fe, "r_gap_epoch": r_ge,
            "r_changes": _corr(dfl, dg), "partial_epoch": partial}


def regime_flatness(files):
    d = load(files[0])
    rows = []
    for arm, f in d["flatness"].items():
        s = flatness_stats(f)
        rows.append([f"{arm} ({f['run']})", s["n"], f"{s['pearson']:.2f}", f"{f['spearman']:.2f}",
                     f"{s['r_flatness_epoch']:.2f}", f"{s['r_gap_epoch']:.2f}", f"{s['r_changes']:.2f}",
                     f"{s['partial_epoch']:.2f}", f"{f['last_flatness']:.3f}", f"{f['last_gap']:.1f}",
                     f"{f['last_test_pgd20']:.1f}"])
    return table(["run (seed 0)", "evaluations", "Pearson (flatness, gap)", "Spearman", "r (flatness, epoch)",
                  "r (gap, epoch)", "r of the changes between evaluations", "partial r given epoch",
                  "flatness at epoch 200", "robust gap at epoch 200", "test PGD-20 at epoch 200"], rows)


# ----------------------------------------------------------------------------- the landscape
def _rise(ck, alphas, a):
    """Mean over directions of loss(alpha) - loss(0) at the alpha nearest ``a`` (must be within 1e-6)."""
    i = min(range(len(alphas)), key=lambda j: abs(alphas[j] - a))
    if abs(alphas[i] - a) > 1e-6:
        raise ValueError(f"alpha {a} is not on the grid {alphas}")
    i0 = min(range(len(alphas)), key=lambda j: abs(alphas[j]))
    return statistics.fmean(c[i] - c[i0] for c in ck["loss"])


LANDSCAPE_MIN_ALPHA = 0.2  # below it (alpha = +-0.1) the rises are < 0.03, within the PGD estimate's noise


def landscape_one(d):
    """Per checkpoint: loss at 0, rises at -0.5, 0.5, -1, 1 and, for the second checkpoint, how much
    smaller its rise is than the first's at every |alpha| >= LANDSCAPE_MIN_ALPHA (min, max in %)."""
    alphas = d["alphas"]
    out = []
    for ck in d["checkpoints"]:
        i0 = min(range(len(alphas)), key=lambda j: abs(alphas[j]))
        out.append({"label": ck["label"], "loss0": statistics.fmean(c[i0] for c in ck["loss"]),
                    "rise": {a: _rise(ck, alphas, a) for a in (-0.5, 0.5, -1.0, 1.0)},
                    "rises": [_rise(ck, alphas, a) for a in alphas if abs(a) >= LANDSCAPE_MIN_ALPHA - 1e-9]})
    first = out[0]["rises"]
    for o in out[1:]:
        red = [100 * (1 - b / a) for a, b in zip(first, o["rises"])]
        o["smaller_min"], o["smaller_max"] = min(red), max(red)
    return out


def landscape_table(files):
    """One file: the values. Several (one per seed): mean ± sd over them."""
    per = [landscape_one(load(f)) for f in files]
    labels = [o["label"] for o in per[0]]
    rows = []
    for i, lab in enumerate(labels):
        vals = [p[i] for p in per]

        def cell(get, nd=2):
            xs = [get(v) for v in vals]
            if len(xs) == 1:
                return f"{xs[0]:.{nd}f}"
            return pm(statistics.fmean(xs), statistics.stdev(xs), nd)

        row = [lab, cell(lambda v: v["loss0"]),
               cell(lambda v: v["rise"][-0.5]) + " / " + cell(lambda v: v["rise"][0.5]),
               cell(lambda v: v["rise"][-1.0]) + " / " + cell(lambda v: v["rise"][1.0])]
        if i == 0:
            row.append("–")
        else:
            lo = min(v["smaller_min"] for v in vals)
            hi = max(v["smaller_max"] for v in vals)
            row.append(f"{lo:.0f}–{hi:.0f} %")
        rows.append(row)
    head = "checkpoint" + (f" ({len(files)} seeds, mean ± sd)" if len(files) > 1 else " (seed 0)")
    return table([head, "PGD-10 loss at α = 0", "loss rise at α = −0.5 / +0.5", "loss rise at α = −1 / +1",
                  f"rise smaller than {labels[0]}'s, over the {len(per[0][0]['rises'])} α ≤ −{LANDSCAPE_MIN_ALPHA} "
                  f"or ≥ {LANDSCAPE_MIN_ALPHA}"
                  + (" of every seed" if len(files) > 1 else "")], rows)


# ----------------------------------------------------------------------------- the earlier study
SUMMARY_KEYS = ("best_test_pgd20", "last_test_pgd20", "best_minus_last", "last_test_clean", "last_train_pgd20",
                "robust_gap")


def _earlier_label(d, arm):
    if arm == "AWP" or arm.startswith("AT-AWP"):
        gamma = d["arms"][arm][d["arms"][arm].index("--awp-gamma") + 1]
        return f"AT-AWP (γ {gamma})" if d["preset"] == "overfit" else arm
    return arm


def earlier_summary(files):
    """Means ± sample standard deviations over the per-seed runs (recomputed here: the JSON's own
    ``summary_mean_std`` is not read, so an edited run changes the table)."""
    d = load(files[0])
    rows = []
    for arm in d["summary_mean_std"]:  # the arms, in the study's order
        runs = d["runs"][arm]
        cells = []
        for k in SUMMARY_KEYS:
            vals = [r[k] for r in runs]
            cells.append(pm(100 * statistics.fmean(vals), 100 * (statistics.stdev(vals) if len(vals) > 1 else 0.0), 2))
        rows.append([_earlier_label(d, arm)] + cells)
    return table(["", "best test PGD-20", "last test PGD-20", "best − last", "last test clean", "last train PGD-20",
                  "robust gap (train − test, last)"], rows)


def _earlier_runs(files, arms=None):
    d = load(files[0])
    rows = []
    for arm, runs in d["runs"].items():
        if arms and arm not in arms:
            continue
        for r in runs:
            rows.append([f"{arm} seed {r['seed']}", r["best_epoch"], f"{100 * r['best_test_pgd20']:.2f}",
                         f"{100 * r['last_test_pgd20']:.2f}", f"{100 * r['last_test_clean']:.2f}",
                         f"{100 * r['robust_gap']:.2f}"])
    return table(["run", "best epoch", "best test PGD-20", "last test PGD-20", "last test clean", "robust gap"], rows)


def earlier_runs(files):
    return _earlier_runs(files)


def earlier_runs_awp(files):
    return _earlier_runs(files, arms=("AT-AWP",))


# ----------------------------------------------------------------------------- the benchmarks
def _bench(name):
    """benchmarks/<name>.py as a module: a benchmark's JSON is read by its own ``summary`` (and a
    gpu_check.json's sections by gpu_check's ``result``), never here."""
    path = os.path.join(ROOT, "benchmarks")
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(name)


def _ms(v):
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


def _q_ms(q):
    """Quartiles ``(p25, median, p75)`` as ``median (p25–p75)``."""
    return f"{_ms(q[1])} ({_ms(q[0])}–{_ms(q[2])})"


def _ladder(path):
    return _bench("bench_train_step").summary(load(path))


def ladder_table(files):
    rows = []
    for rung, r in _ladder(files[0])["rungs"].items():
        rows.append([f"({rung}) {r['name']}", "yes" if r["same_algorithm"] else "no", _q_ms(r["at_awp_ms"]),
                     _q_ms(r["at_ms"]), _q_ms(r["awp_extra_ms"]), _ms(r["fwd_bwd_ms"]), f"{r['extra_over_fwd_bwd']:.2f}",
                     "–" if r["vs_previous"] is None else f"{r['vs_previous']:.2f}×",
                     "–" if r["vs_a"] is None else f"{r['vs_a']:.2f}×"])
    return table(["rung (each adds one change to the rung above)", "same algorithm as (a)",
                  "AT-AWP step ms (quartiles)", "AT step ms (quartiles)", "AWP extra ms (quartiles)",
                  "one fwd+bwd ms", "AWP extra / fwd+bwd", "AT-AWP vs the rung above", "AT-AWP vs (a)"], rows)


def ladder_cheap(files):
    rows = [[f"at ({c['at_rung']}): {c['row']}", _ms(c["step_ms"]), _ms(c["awp_extra_ms"]),
             f"{c['extra_over_fwd_bwd']:.2f}"] for c in _ladder(files[0])["cheap"]]
    return table(["row", "step ms (median)", "AWP extra over AT, ms", "AWP extra / one fwd+bwd"], rows)


def ladder_conditions(files):
    c = _ladder(files[0])["conditions"]
    lo, med, hi = c["load"]
    same = c["x_adv_b_c"]
    return table(["model", "batch", "attack", "device", "threads", "measured rounds (after warm-up)",
                  "load average, 1 min: median (min–max) over the rounds", "x_adv of (c) equals (b)"],
                 [[c["model"], c["batch"], f"PGD-{c['attack_steps']}", c["device"], c["threads"],
                   f"{c['measured_rounds']} ({c['warmup_rounds']})", f"{med:.2f} ({lo:.2f}–{hi:.2f})",
                   same if same == "bitwise" else ("not checked" if same is None else f"max diff {same:.1e}")]])


# ----------------------------------------------------------------------------- README
def readme_results(files):
    bws, bts, gc = _bench("bench_weight_side"), _bench("bench_train_step"), _bench("gpu_check")
    cpu, h100 = bws.summary(load(files[0])), load(files[1])
    rows = []
    n32, r32 = cpu[("wrn34-10", "float32", "native")], cpu[("wrn34-10", "float32", "reference-eager")]
    n16, r16 = cpu[("wrn34-10", "bfloat16", "native")], cpu[("wrn34-10", "bfloat16", "reference-eager")]
    rows.append(["**Weight side, 2-core CPU**: WRN-34-10 perturb + restore, same algorithm",
                 f"{n32['single_ms']:.1f} ms against {r32['single_ms']:.1f} ms for reference-style eager code: "
                 f"**{r32['single_ms'] / n32['single_ms']:.1f}×** fp32 "
                 f"({r16['single_ms'] / n16['single_ms']:.1f}× bf16)",
                 f"`{files[0]}`"])
    hw = bws.summary(gc.result(h100, "bench_weight"))
    t32, e32 = hw[("wrn34-10", "float32", "triton")], hw[("wrn34-10", "float32", "reference-eager")]
    t16, e16 = hw[("wrn34-10", "bfloat16", "triton")], hw[("wrn34-10", "bfloat16", "reference-eager")]
    rows.append(["**Weight side, H100, kernel time** (CUDA-graph replay against CUDA-graph replay), same algorithm",
                 f"{t32['graph_ms']:.2f} ms against {e32['graph_ms']:.2f} ms: **{e32['graph_ms'] / t32['graph_ms']:.1f}×** "
                 f"fp32; {t16['graph_ms']:.2f} against {e16['graph_ms']:.2f} ms: "
                 f"**{e16['graph_ms'] / t16['graph_ms']:.1f}×** bf16; {t32['graph_ms'] / t32['floor_ms']:.2f}× and "
                 f"{t16['graph_ms'] / t16['floor_ms']:.2f}× the bytes floor",
                 f"`{files[1]}`"])
    tr = bts.summary(gc.result(h100, "bench_train"))["configs"]
    ref, fast = tr["reference"], tr["awpfast fp32"]
    rows.append(["**Share of a training step** (H100, WRN-34-10 AT-AWP, batch 128, PGD-10)",
                 f"the weight side is {t32['graph_ms']:.2f} ms of kernel time ({t32['single_ms']:.2f} ms for one "
                 f"isolated call), {100 * t32['graph_ms'] / fast['at_awp_ms']:.2f} % of the "
                 f"{fast['at_awp_ms']:.0f} ms awpfast fp32 step; AWP's extra time over AT is "
                 f"{fast['awp_extra_ms']:.1f} ms (awpfast) against {ref['awp_extra_ms']:.1f} ms (reference pattern), "
                 f"{ref['awp_extra_ms'] - fast['awp_extra_ms']:.1f} ms apart in a {ref['at_awp_ms']:.0f} ms "
                 f"reference step; that extra is {fast['extra_over_fwd_bwd']:.1f}× one forward + backward",
                 "the same file, section `bench_train`"])
    lad = bts.summary(load(files[2]))
    c, rg = lad["conditions"], lad["rungs"]
    a, b, cc = (rg[r]["at_awp_ms"][1] for r in "abc")
    ab, bc = rg["b"]["paired_vs_previous"], rg["c"]["paired_vs_previous"]
    lo, _, hi = c["load"]
    quiet = hi <= 4
    rows.append([f"**Training step, same algorithm** ({c['device']}, {c['threads']} threads, load "
                 f"average {lo:.1f}-{hi:.1f}; "
                 f"{c['model']}, batch {c['batch']}, PGD-{c['attack_steps']}: ladder rungs a → b → c, "
                 f"{c['measured_rounds']} interleaved rounds)",
                 f"AT-AWP step {a / 1e3:.2f} s (reference pattern) → "
                 f"{b / 1e3:.2f} s (awpfast's AWP, same attack: paired "
                 f"{ab[1]:.2f}× [quartiles {ab[0]:.2f}, {ab[2]:.2f}]) → {cc / 1e3:.2f} s "
                 f"(input-only attack gradients, the same x_adv: {bc[1]:.2f}× [{bc[0]:.2f}, {bc[2]:.2f}])"
                 + ("; on this CPU the same-algorithm speed-up comes from the input-only attack gradients, not from "
                    "the weight-side kernels" if quiet and ab[0] <= 1.0 <= ab[2] and bc[0] > 1.0 else "")
                 + ("" if quiet else "; measured at a load average above 4: not a result")
                 + ". The eval-mode attack, bf16 and channels_last rungs change the algorithm or the precision: "
                 "[docs/performance.md](docs/performance.md#a-training-step-one-change-at-a-time)",
                 f"`{files[2]}`"])
    return table(["what", "result", "data"], rows)


def _fraction_of_awp(cost, arm):
    """``(median, q1, q3)`` of ``arm``'s paired extra time over AT as a fraction of exact AWP's median extra
    (a scripts/study.py cost JSON), or None where the arm was not timed."""
    e = cost["arms"].get(arm)
    if not e or "fraction_of_awp_extra" not in e:
        return None
    base = cost["arms"]["AWP"]["extra_vs_AT"]["median_s"]
    return e["fraction_of_awp_extra"], e["extra_vs_AT"]["q1_s"] / base, e["extra_vs_AT"]["q3_s"] / base


def cheap_costs(files):
    """The cheap ascents' and RWP's extra cost over AT: in forward+backward units (bench_train_step ladder,
    rung d) and as a fraction of exact AWP's extra, paired by round (scripts/study.py cost, one thread) on
    PreActResNet-18 and on the study's SmallCNN; next to the study's verdict on robust accuracy."""
    bench, c18, csmall = _ladder(files[0]), load(files[1]), load(files[2])
    st = _study()
    sm = st.summarize(os.path.join(ROOT, files[3]))
    rows_b = {r["label"]: r for r in bench["cheap"]}
    cond = bench["conditions"]
    labels = {"AWP": ("separate", "exact AT-AWP (separate ascent pass)"), "attack": ("sourced", "attack-sourced"),
              "attack-evalbn": (None, "attack-sourced, eval-mode attack (its cost includes the attack mode's own; "
                                  "its accuracy is against exact AT-AWP with the eval-mode attack)"),
              "every2": ("every2", "every 2 steps"), "sub0.25": ("subbatch0.25", "sub-batch 0.25"),
              "momentum": ("momentum", "momentum-sourced"), "rwp": ("rwp10", "RWP (10 passes)")}

    def frac(cost, arm):
        f = _fraction_of_awp(cost, arm)
        return "–" if f is None else f"{f[0]:.2f} [{f[1]:.2f}, {f[2]:.2f}]"
    rows = []
    for arm, (lab, name) in labels.items():
        b = rows_b.get(lab)
        entry = sm["arms"].get(arm, {})
        v = entry.get("verdict")
        n = len(entry.get("seeds", []))
        ch = entry.get("at_chance") or {}
        fell = f"; {len(ch)} of {n} ended at chance accuracy" if ch else ""
        acc = ("the reference" + fell if arm == "AWP" else
               (st.verdict_words(v) + fell if v else
                (f"{n} seed{'s' * (n != 1)} run, reported only{fell}" if n else "not run yet")))
        rows.append([name, "–" if not b else f"{b['extra_over_fwd_bwd']:.2f}", frac(c18, arm), frac(csmall, arm),
                     acc])
    return table([f"ascent ({cond['model']}, batch {cond['batch']}, PGD-{cond['attack_steps']})",
                  f"extra over AT ÷ one forward+backward ({cond['threads']} threads, {cond['measured_rounds']} rounds)",
                  f"÷ exact AWP's extra, PreActResNet-18, 1 thread [quartiles] ({c18['reps']} rounds)",
                  f"÷ exact AWP's extra, the study's SmallCNN [quartiles] ({csmall['reps']} rounds)",
                  "robust accuracy against exact AWP (the study)"], rows)


def _ms_t(vals):
    """mean, s.d. (n - 1), n, values and the one-sample t of the non-missing ``vals`` (None if none)."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    m = statistics.fmean(vals)
    out = {"mean": m, "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals), "values": vals}
    if len(vals) > 1:
        out["t"] = m / (out["std"] / math.sqrt(len(vals))) if out["std"] > 0 else (math.inf if m else 0.0)
    return out


EARLIER_CHEAP_KEYS = ("last_pgd20", "autoattack", "best_pgd20", "last_clean", "robust_gap", "train_s_per_awp_epoch")
EARLIER_CHEAP_EXACT = {"attack-sourced, eval-mode attack": "AT-AWP separate, eval-mode attack"}
T_CRIT_5PCT = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # two-sided 5 %


def earlier_cheap_summary(runs: dict) -> dict:
    """The earlier cheap-ascent study's summary recomputed from its per-seed rows (``runs[arm][seed]``): per arm the
    mean / s.d. of each metric, the paired differences (same seed) to exact AT-AWP and to AT, and the
    old keeps-the-gain criterion (mean difference >= -1 point on last PGD-20 and AutoAttack, gain over AT
    significant); an edited per-seed number changes the tables."""
    summary = {}
    for arm, rows in runs.items():
        summary[arm] = {k: _ms_t([r.get(k) for r in rows.values()]) for k in EARLIER_CHEAP_KEYS}
        for base_key, base in (("vs_exact", EARLIER_CHEAP_EXACT.get(arm, "AT-AWP separate")), ("vs_AT", "AT")):
            if arm == base or base not in runs or (base_key == "vs_exact" and arm in ("AT", *EARLIER_CHEAP_EXACT.values())):
                continue
            summary[arm][base_key] = {"base": base}
            for k in ("last_pgd20", "autoattack", "best_pgd20"):
                summary[arm][base_key][k] = _ms_t([rows[s][k] - runs[base][s][k] for s in rows if s in runs[base]
                                                   and rows[s].get(k) is not None
                                                   and runs[base][s].get(k) is not None])
    for arm in summary:
        if arm == "AT" or arm in EARLIER_CHEAP_EXACT.values() or arm == "AT-AWP separate":
            continue
        ve, va = summary[arm].get("vs_exact", {}), summary[arm].get("vs_AT", {})
        within = all(ve.get(k) and ve[k]["mean"] >= -1.0 for k in ("last_pgd20", "autoattack"))
        sig = all(va.get(k) and va[k]["n"] > 1 and va[k]["mean"] > 0 and va[k]["t"] > T_CRIT_5PCT[va[k]["n"] - 1]
                  for k in ("last_pgd20", "autoattack"))
        enough = all(ve.get(k) and va.get(k) and va[k]["n"] > 1 for k in ("last_pgd20", "autoattack"))
        summary[arm]["keeps_gain"] = bool(within and sig) if enough else None
    return summary


def cheap_ascent(files):
    """The earlier cheap-ascent study's two tables (its runner, scripts/cheap_ascent_study.py, was replaced by
    scripts/study.py; see git history), recomputed from the per-seed rows of its JSON."""
    d = load(files[0])
    runs = {arm: {int(s): r for s, r in rows.items()} for arm, rows in d["runs"].items()}
    summary, seeds, cpu = earlier_cheap_summary(runs), d["seeds"], d["cpu_cost"]
    f = lambda m: "–" if not m else f"{m['mean']:.1f} ± {m['std']:.1f}"  # noqa: E731
    ft = lambda m: "–" if not m or "t" not in m else f"{m['t']:.1f}"  # noqa: E731
    out = [f"| arm (seeds {' '.join(map(str, seeds))}) | n | last PGD-20 | AutoAttack | best PGD-20 | last clean | "
           "robust gap | wall s / AWP epoch | CPU s / AWP epoch |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, sm in summary.items():
        c = (cpu or {}).get("cpu_s_per_epoch", {}).get(_EARLIER_CHEAP_NAMES.get(arm)) if cpu else None
        out.append(f"| {arm} | {sm['last_pgd20']['n']} | {f(sm['last_pgd20'])} | {f(sm['autoattack'])} | "
                   f"{f(sm['best_pgd20'])} | {f(sm['last_clean'])} | {f(sm['robust_gap'])} | "
                   f"{f(sm['train_s_per_awp_epoch'])} | {'–' if c is None else f'{c:.2f}'} |")
    out += ["", "| arm − base (paired by seed) | last PGD-20 | t | AutoAttack | t | best PGD-20 | t | keeps the gain |",
            "|---|---|---|---|---|---|---|---|"]
    for arm, sm in summary.items():
        for key in ("vs_exact", "vs_AT"):
            if key not in sm:
                continue
            dd = sm[key]
            keep = {True: "yes", False: "no", None: "not decided (too few seeds with AutoAttack)"}[
                sm.get("keeps_gain")] if key == "vs_exact" else ""
            out.append(f"| {arm} − {dd['base']} | {f(dd['last_pgd20'])} | {ft(dd['last_pgd20'])} | "
                       f"{f(dd['autoattack'])} | {ft(dd['autoattack'])} | {f(dd['best_pgd20'])} | "
                       f"{ft(dd['best_pgd20'])} | {keep or ''} |")
    return "\n".join(out)


# the earlier cheap-ascent study's arms: their candidate names (their CPU-cost keys)
_EARLIER_CHEAP_NAMES = {"AT": "n320-e15-n20-long", "AT-AWP separate": "long-awp0.01", "attack-sourced": "long-awp0.01-attack",
                  "every 2": "long-awp0.01-every2", "every 4": "long-awp0.01-every4",
                  "AT-AWP separate, eval-mode attack": "long-awp0.01-evalbn",
                  "attack-sourced, eval-mode attack": "long-awp0.01-evalbn-attack"}


def _study():
    """scripts/study.py (the seed-paired study runner) as a module: its summary is computed from the
    committed per-run records, never read from a precomputed file."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("awpfast_study",
                                                  os.path.join(os.path.dirname(os.path.abspath(__file__)), "study.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def study_tables(files):
    """The study's per-arm table and its verdicts (scripts/study.py markdown of its summary)."""
    st = _study()
    return st.markdown(st.summarize(os.path.join(ROOT, files[0])))


def _ci(m):
    if not m:
        return "–"
    if "ci95" not in m:
        return f"{m['mean']:+.1f} (one seed: no interval yet)"
    return f"{m['mean']:+.1f} [{m['ci95'][0]:+.1f}, {m['ci95'][1]:+.1f}]"


def _chance_clause(sm, seeds, diffs):
    """The paired runs of AT-AWP and AT that ended at chance accuracy, and the median difference next to the
    mean: one collapsed run moves a mean of a few seeds by tens of points, and the t interval then describes
    no seed; empty when no paired run collapsed."""
    fell = {arm: {k: ep for k, ep in (sm["arms"][arm].get("at_chance") or {}).items() if k in seeds}
            for arm in ("AWP", "AT")}
    if not any(fell.values()):
        return ""

    def runs(arm, name):
        f = fell[arm]
        return f"{name} {len(f)} of {len(seeds)}" + (
            " (" + ", ".join(f"seed {k} from epoch {ep}" for k, ep in f.items()) + ")" if f else "")
    return (f". Runs that ended at chance accuracy: {runs('AWP', 'AT-AWP')}, {runs('AT', 'AT')}; the median "
            f"paired difference is {statistics.median(diffs):+.1f} points, and with a collapsed run the t "
            "interval describes no seed")


def readme_study(files):
    """README's headline: exact AT-AWP against AT, paired by seed, from the study's committed runs."""
    st = _study()
    sm = st.summarize(os.path.join(ROOT, files[0]))
    awp = sm["arms"].get("AWP")
    if not awp or not awp.get("vs_AT") or not awp["vs_AT"].get("last3_pgd20"):
        return table(["what", "result", "data"], [["**Does AWP help?**", "the study has no paired seed yet",
                                                   f"`{files[0]}`"]])
    va = awp["vs_AT"]
    n = va["last3_pgd20"]["n"]
    per = ", ".join(f"{v:+.1f}" for v in va["last3_pgd20"]["values"])
    # the two levels over the paired seeds only (the seeds of the difference), not each arm's own seeds
    seeds = [str(k) for k in va["last3_pgd20"]["seeds"]]
    at_lvl, aw_lvl = ([sm["arms"][arm]["per_seed"][k]["last3_pgd20"] for k in seeds] for arm in ("AT", "AWP"))
    rows = [["**Does AWP help?** AT-AWP (γ = 0.01) against plain AT on digits 8×8 with 20 % noisy training labels, "
             f"200 epochs, paired by seed (n = {n}{'' if n >= 10 else '; the study aims at 10 and is in progress'})",
             f"mean of the last 3 test PGD-20 evaluations **{_ci(va['last3_pgd20'])}** points (mean [95 % CI]; "
             f"per seed {per}); AutoAttack of the final weights {_ci(va['autoattack'])}; on these seeds AT "
             f"ends at {sum(at_lvl) / n:.1f} %, AT-AWP at {sum(aw_lvl) / n:.1f} % (last 3 PGD-20, mean)"
             + _chance_clause(sm, seeds, va["last3_pgd20"]["values"]),
             "[docs/reproduction.md](docs/reproduction.md#the-study-that-decides), `docs/study/records/`"]]
    return table(["what", "result", "data"], rows)


def _cost_help(cost18, csmall, arm):
    """``arm``'s extra training-step cost over AT as a fraction of exact AWP's, paired medians (scripts/study.py
    cost, one thread): PreActResNet-18 where measured, else the study's SmallCNN."""
    for cost, model in ((cost18, "PreActResNet-18"), (csmall, "the study's SmallCNN")):
        f = _fraction_of_awp(cost, arm)
        if f is not None:
            where = (f"({model}, CPU, 1 thread, {cost['reps']} paired rounds"
                     + ("; the eval-mode attack's own cost included" if arm.endswith("-evalbn") else "") + ")")
            if f[1] <= 0.0 <= f[2]:  # the quartiles of its extra over AT straddle zero
                return (f"no extra time over AT that the timing resolves (median {f[0]:.2f} of exact AWP's extra, "
                        f"quartiles {f[1]:.2f}, {f[2]:.2f}) {where}")
            return f"costs {f[0]:.2f} of exact AWP's extra time over AT [quartiles {f[1]:.2f}, {f[2]:.2f}] {where}"
    return "cost not measured yet"


def _accuracy_help(entry):
    """The study's word on ``entry``'s robust accuracy against exact AWP: the verdict and the paired differences
    it rests on (last-3 PGD-20 and AutoAttack, mean [95 % CI] once there are two seeds)."""
    ve = entry.get("vs_exact") or {}
    d, a = ve.get("last3_pgd20"), ve.get("autoattack")
    if not d or not a:
        return "its robust accuracy is not measured yet (scripts/study.py)"

    def diff(m, name):
        ci = f" [95 % CI {m['ci95'][0]:+.1f}, {m['ci95'][1]:+.1f}]" if "ci95" in m else ""
        return f"{name} {m['mean']:+.1f}{ci}"
    base = "exact AWP with the eval-mode attack" if ve.get("base") != "AWP" else "exact AWP"
    nums = (f"{diff(d, 'last-3 PGD-20')}, {diff(a, 'AutoAttack')} points, "
            f"n = {d['n']} paired seed{'s' * (d['n'] != 1)}, digits 8x8")
    v = entry.get("verdict")
    head = (f"robust accuracy against {base} reported, not concluded:" if v is None else
            f"robust accuracy against {base} (the study): {_study().verdict_words(v)};")
    ch = entry.get("at_chance") or {}
    fell = (f"; {len(ch)} of {len(entry['seeds'])} runs ended at chance accuracy (seed "
            + ", ".join(f"{k} from epoch {e}" for k, e in ch.items()) + ")") if ch else ""
    return f"{head} {nums}{fell}"


HELP_ARMS = ("attack", "attack-evalbn", "momentum", "every2", "sub0.25", "rwp")


def _py_str(s, indent=8, width=96):
    """``s`` as implicitly concatenated Python string literals, one per line of at most ``width``."""
    import textwrap
    parts = textwrap.wrap(s, width - indent - 4, break_long_words=False, break_on_hyphens=False)
    return "\n".join(" " * indent + repr(p + (" " if k < len(parts) - 1 else "")) for k, p in enumerate(parts))


def ascent_help(files):
    """awpfast/train/measured.py's sentences, one per cheap ascent and RWP: what it costs (paired, against exact
    AWP's extra) and what the study says of its robust accuracy; ``awpfast-train --help`` prints them."""
    cost18, csmall = load(files[0]), load(files[1])
    sm = _study().summarize(os.path.join(ROOT, files[2]))
    out = ["MEASURED = {"]
    for arm in HELP_ARMS:
        s = f"{_cost_help(cost18, csmall, arm)}; {_accuracy_help(sm['arms'].get(arm, {}))}"
        out += [f"    {arm!r}: (", _py_str(s) + "),"]
    return "\n".join(out + ["}"])


BLOCKS: Dict[str, Callable[[List[str]], str]] = {
    "regime-arms": regime_arms,
    "regime-at-seeds": regime_at_seeds,
    "regime-paired": regime_paired,
    "regime-flatness": regime_flatness,
    "landscape": landscape_table,
    "earlier-summary": earlier_summary,
    "earlier-runs": earlier_runs,
    "earlier-runs-awp": earlier_runs_awp,
    "ladder": ladder_table,
    "ladder-cheap": ladder_cheap,
    "ladder-conditions": ladder_conditions,
    "readme-results": readme_results,
    "cheap-ascent": cheap_ascent,
    "study": study_tables,
    "readme-study": readme_study,
    "cheap-costs": cheap_costs,
    "ascent-help": ascent_help,
}


# ----------------------------------------------------------------------------- settings tables
NUM = re.compile(r"(?<![\w.])[-−]?\d+(?:[.,]\d+)*(?:\.\d+)?")


def numbers_in(text):
    out = set()
    for m in NUM.findall(text):
        m = m.replace("−", "-").replace(",", "")
        try:
            out.add(float(m))
        except ValueError:
            pass
    return out


def settings_allowed(files):
    allowed = set()
    for f in files:
        allowed |= numbers_in(json.dumps(load(f), ensure_ascii=False))
    return allowed


def settings_problems(block_text, files, extra):
    """Numbers of a hand-written settings table that are not in its JSON (nor in the marker's
    stated derivations ``extra``)."""
    allowed = settings_allowed(files) | extra
    return sorted(x for x in numbers_in(block_text) if not any(math.isclose(x, a, rel_tol=1e-9, abs_tol=1e-12)
                                                               for a in allowed))


# ----------------------------------------------------------------------------- the markers
def blocks(text):
    """``[(name, files, start_line, end_line)]`` of a document (lines 0-based; the table lies
    strictly between them)."""
    lines = text.split("\n")
    out, cur = [], None
    for i, line in enumerate(lines):
        m = START.match(line)
        if m:
            if cur is not None:
                raise ValueError(f"line {i + 1}: a numbers block opens inside another one")
            files = [f.strip() for f in (m.group("files") or m.group("pfiles")).split(",") if f.strip()]
            cur = (m.group("name") or m.group("pname"), files, i)
        elif line.strip() in (END, PY_END):
            if cur is None:
                raise ValueError(f"line {i + 1}: {END} without an opening marker")
            out.append(cur + (i,))
            cur = None
    if cur is not None:
        raise ValueError(f"the numbers block {cur[0]!r} is never closed")
    return out


SETTINGS_EXTRA = re.compile(r"^<!-- derived: (?P<nums>[^>]*) -->$")


def render(text, path="<text>"):
    """``(text with every block regenerated, problems)``: problems are blocks that differ from
    their JSON (with a diff), settings blocks with numbers their JSON lacks, unknown blocks and
    missing files."""
    lines = text.split("\n")
    problems = []
    new = list(lines)
    for name, files, i, j in reversed(blocks(text)):
        missing = [f for f in files if not os.path.exists(os.path.join(ROOT, f))]
        if missing:
            problems.append(f"{path}:{i + 1}: block {name}: missing {missing}")
            continue
        have = "\n".join(lines[i + 1:j])
        if name.endswith("-settings"):
            extra = set()
            body = lines[i + 1:j]
            if body and SETTINGS_EXTRA.match(body[-1].strip()):
                extra = numbers_in(SETTINGS_EXTRA.match(body[-1].strip()).group("nums"))
                have = "\n".join(body[:-1])
            bad = settings_problems(have, files, extra)
            if bad:
                problems.append(f"{path}:{i + 1}: settings block {name}: numbers not in {files}: {bad}")
            continue
        if name not in BLOCKS:
            problems.append(f"{path}:{i + 1}: unknown numbers block {name!r}")
            continue
        want = BLOCKS[name](files)
        if have != want:
            new[i + 1:j] = want.split("\n")
            diff = "\n".join(difflib.unified_diff(have.split("\n"), want.split("\n"), "doc", "generated",
                                                  lineterm="", n=0))
            problems.append(f"{path}:{i + 1}: block {name} differs from {files}:\n{diff}")
    return "\n".join(new), problems


def process(path, write=False):
    """Regenerate (``write``) or compare the blocks of one document. Returns the problems left
    (after a write: only those that writing cannot fix)."""
    full = os.path.join(ROOT, path)
    with open(full) as f:
        text = f.read()
    new, problems = render(text, path)
    if not write:
        return problems
    if new != text:
        with open(full, "w") as f:
            f.write(new)
        print(f"rewrote the numbers of {path}")
    return [p for p in problems if " differs from " not in p]


def tables_outside_blocks(path, only_after=None, only_before=None):
    """Line numbers (1-based) of markdown table rows that are not inside a numbers block."""
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    lines = text.split("\n")
    inside = set()
    for _, _, i, j in blocks(text):
        inside |= set(range(i + 1, j))
    lo = 0 if only_after is None else next(k for k, l in enumerate(lines) if l.startswith(only_after))
    hi = len(lines) if only_before is None else next(k for k, l in enumerate(lines) if k > lo and
                                                     l.startswith(only_before))
    in_code = False
    out = []
    for k, line in enumerate(lines):
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not (lo <= k < hi):
            continue
        if line.startswith("|") and k not in inside:
            out.append(k + 1)
    return out


STUDY_JSON = "docs/study.json"


def _same_json(a, b, rel=1e-9) -> bool:
    """Parsed JSON ``a`` and ``b`` equal, floats within ``rel`` of each other (another libm's t quantiles may
    differ in the last bits; a rounding to N digits could still flip at a boundary)."""
    if isinstance(a, float) or isinstance(b, float):
        return (isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
                and math.isclose(a, b, rel_tol=rel, abs_tol=1e-12))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y, rel) for x, y in zip(a, b))
    return a == b


def study_json(write: bool) -> list:
    """docs/study.json, the study's summary recomputed from the committed records: rewritten, or (``write``
    False) the problem that the committed file differs."""
    path = os.path.join(ROOT, STUDY_JSON)
    text = _study().summary_json()
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
    if old is not None and _same_json(json.loads(old), json.loads(text)):
        return []
    if not write:
        return [f"{STUDY_JSON}: not the summary of docs/study/records"]
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"rewrote {STUDY_JSON}")
    return []


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    ap.add_argument("docs", nargs="*", default=DOCS)
    a = ap.parse_args(argv)
    problems = []
    for doc in a.docs:
        problems += process(doc, write=not a.check)
    if a.docs == DOCS:
        problems += study_json(write=not a.check)
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
