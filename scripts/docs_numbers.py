#!/usr/bin/env python
"""The numbers of docs/reproduction.md's tables, README.md's results table and the training-step
ladder of docs/performance.md, generated from the committed JSON.

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
import json
import math
import os
import re
import statistics
import sys
from typing import Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["docs/reproduction.md", "README.md", "docs/performance.md"]
START = re.compile(r"^<!-- numbers: (?P<name>[\w.-]+) \((?P<files>[^)]*)\) -->\s*$")
END = "<!-- /numbers -->"


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
    d = load(files[0])
    rows = []
    for arm, s in d["summary_mean_std"].items():
        rows.append([_earlier_label(d, arm)] + [pm(100 * s[k][0], 100 * s[k][1], 2) for k in SUMMARY_KEYS])
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


# ----------------------------------------------------------------------------- the training-step ladder
def _ms(v):
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


def _device(d):
    if d["device"] == "cpu":
        return f"{d.get('cpu_count') or '?'}-core CPU ({d['device_name']})"
    return d["device_name"] or d["device"]


def ladder_table(files):
    d = load(files[0])
    rows = []
    for r in d["rungs"]:
        a, b, fb, ex = r["at_awp_ms"], r["at_ms"], r["fwd_bwd_ms"], r["awp_extra_ms"]
        rows.append([f"({r['rung']}) {r['name']}", "yes" if r["same_algorithm_as_a"] else "no",
                     f"{_ms(a['median'])} ({_ms(a['p25'])}–{_ms(a['p75'])})",
                     f"{_ms(b['median'])} ({_ms(b['p25'])}–{_ms(b['p75'])})",
                     f"{_ms(ex['median'])} ({_ms(ex['p25'])}–{_ms(ex['p75'])})", _ms(fb["median"]),
                     f"{r['awp_extra_over_fwd_bwd']:.2f}",
                     f"{r['speedup_at_awp_vs_previous_rung']:.2f}×" if "speedup_at_awp_vs_previous_rung" in r else "–",
                     f"{r['speedup_at_awp_vs_a']:.2f}×" if "speedup_at_awp_vs_a" in r else "–"])
    return table(["rung (each adds one change to the rung above)", "same algorithm as (a)",
                  "AT-AWP step ms (quartiles)", "AT step ms (quartiles)", "AWP extra ms (quartiles)",
                  "one fwd+bwd ms", "AWP extra / fwd+bwd", "AT-AWP vs the rung above", "AT-AWP vs (a)"], rows)


def ladder_cheap(files):
    d = load(files[0])
    rows = []
    for r in d["cheap_rows"]:
        if "step_ms" not in r:
            continue
        rows.append([f"at ({r['at_rung']}): {r['row']}", _ms(r["step_ms"]), _ms(r["awp_extra_ms"]),
                     f"{r['awp_extra_over_fwd_bwd']:.2f}"])
    return table(["row", "step ms (median)", "AWP extra over AT, ms", "AWP extra / one fwd+bwd"], rows)


def ladder_conditions(files):
    d = load(files[0])
    la = d["loadavg"]
    return table(["model", "batch", "attack", "device", "threads", "measured rounds (after warm-up)",
                  "load average, 1 min: median (min–max) over the rounds", "x_adv of (c) equals (b)"],
                 [[d["model"], d["batch"], f"PGD-{d['attack_steps']}", _device(d), d["threads"],
                   f"{d['measured_rounds']} ({d['warmup_rounds']})",
                   f"{la['one_minute_median']:.2f} ({la['one_minute_min']:.2f}–{la['one_minute_max']:.2f})",
                   "bitwise" if (d.get("x_adv_b_equals_c") or {}).get("bitwise_equal") else
                   ("not checked" if d.get("x_adv_b_equals_c") is None else
                    f"max diff {d['x_adv_b_equals_c']['max_abs_diff']:.1e}")]])


# ----------------------------------------------------------------------------- README
def _weight_row(rows, model, dtype, variant):
    return next(r for r in rows if r.get("model") == model and r.get("dtype") == dtype and r.get("variant") == variant)


def readme_results(files):
    reg, cpu, h100, ladder = (load(f) for f in files)
    t = reg["table"]["AT-AWP g0.01"]
    last = t["paired_last_vs_base"]
    bm, bsd, bt = paired_best(reg, "AT-AWP g0.01")
    seeds = ", ".join(f"{v:+.1f}" for v in last["values"])
    rows = [[
        "**Does AWP help?** AT-AWP (γ = 0.01) against plain AT, in a regime where AT overfits 20 % noisy "
        "training labels (AT peaks before the first LR decay)",
        f"**{last['mean']:+.1f} ± {last['std']:.1f} points** (mean ± s.d. over seeds) of last-epoch test PGD-20, "
        f"paired by seed (seeds 0, 1, 2: {seeds}; paired t = {last['t']:.0f}); at the best epoch "
        f"{bm:+.1f} ± {bsd:.1f} (t = {bt:.1f}); robust gap {reg['table']['AT']['gap']['mean']:.1f} → "
        f"{t['gap']['mean']:.1f} points",
        "[docs/reproduction.md](docs/reproduction.md), `docs/reproduction_regime.json`"]]
    wr = cpu["rows"]
    n32, r32 = _weight_row(wr, "wrn34-10", "float32", "native"), _weight_row(wr, "wrn34-10", "float32", "reference-eager")
    n16, r16 = (_weight_row(wr, "wrn34-10", "bfloat16", "native"),
                _weight_row(wr, "wrn34-10", "bfloat16", "reference-eager"))
    rows.append(["**Weight side, 2-core CPU**: WRN-34-10 perturb + restore, same algorithm",
                 f"{n32['median_ms']:.1f} ms against {r32['median_ms']:.1f} ms for reference-style eager code: "
                 f"**{r32['median_ms'] / n32['median_ms']:.1f}×** fp32 "
                 f"({r16['median_ms'] / n16['median_ms']:.1f}× bf16)",
                 f"`{files[1]}`"])
    hw = h100["sections"]["bench_weight"]["result"]["rows"]
    t32, e32 = _weight_row(hw, "wrn34-10", "float32", "triton"), _weight_row(hw, "wrn34-10", "float32", "reference-eager")
    t16, e16 = (_weight_row(hw, "wrn34-10", "bfloat16", "triton"),
                _weight_row(hw, "wrn34-10", "bfloat16", "reference-eager"))
    rows.append(["**Weight side, H100, kernel time** (CUDA-graph replay against CUDA-graph replay), same algorithm",
                 f"{t32['graph_ms']:.2f} ms against {e32['graph_ms']:.2f} ms: **{e32['graph_ms'] / t32['graph_ms']:.1f}×** "
                 f"fp32; {t16['graph_ms']:.2f} against {e16['graph_ms']:.2f} ms: "
                 f"**{e16['graph_ms'] / t16['graph_ms']:.1f}×** bf16; {t32['graph_ms'] / t32['floor_ms']:.2f}× and "
                 f"{t16['graph_ms'] / t16['floor_ms']:.2f}× the bytes floor",
                 f"`{files[2]}`"])
    tr = {r["config"]: r for r in h100["sections"]["bench_train"]["result"]["rows"]}
    ref, fast = tr["reference"], tr["awpfast fp32"]
    rows.append(["**Share of a training step** (H100, WRN-34-10 AT-AWP, batch 128, PGD-10)",
                 f"the weight side is {t32['graph_ms']:.2f} ms of kernel time ({t32['median_ms']:.2f} ms for one "
                 f"isolated call), {100 * t32['graph_ms'] / fast['at_awp_ms']:.2f} % of the "
                 f"{fast['at_awp_ms']:.0f} ms awpfast fp32 step; AWP's extra time over AT is "
                 f"{fast['awp_extra_ms']:.1f} ms (awpfast) against {ref['awp_extra_ms']:.1f} ms (reference pattern), "
                 f"{ref['awp_extra_ms'] - fast['awp_extra_ms']:.1f} ms apart in a {ref['at_awp_ms']:.0f} ms "
                 f"reference step; that extra is {fast['awp_extra_over_fwd_bwd']:.1f}× one forward + backward",
                 "the same file, section `bench_train`"])
    rg = {r["rung"]: r for r in ladder["rungs"]}
    a, b, c = rg["a"], rg["b"], rg["c"]
    rows.append([f"**Training step, same algorithm** ({_device(ladder)}, {ladder['threads']} threads, load "
                 f"average {ladder['loadavg']['one_minute_median']:.1f}; "
                 f"{ladder['model']}, batch {ladder['batch']}, PGD-{ladder['attack_steps']}: ladder rungs a → b → c)",
                 f"AT-AWP step {a['at_awp_ms']['median'] / 1e3:.2f} s (reference pattern) → "
                 f"{b['at_awp_ms']['median'] / 1e3:.2f} s (awpfast's AWP, same attack: "
                 f"{b['speedup_at_awp_vs_a']:.2f}×) → {c['at_awp_ms']['median'] / 1e3:.2f} s (input-only attack "
                 f"gradients, the same x_adv: {c['speedup_at_awp_vs_a']:.2f}×); AWP's extra over AT "
                 f"{a['awp_extra_over_fwd_bwd']:.2f} / {b['awp_extra_over_fwd_bwd']:.2f} / "
                 f"{c['awp_extra_over_fwd_bwd']:.2f}× one forward + backward"
                 + ("; the quartiles of (a) and (c) overlap at this load, so this CPU run does not resolve the "
                    "speed-up" if c["at_awp_ms"]["p75"] >= a["at_awp_ms"]["p25"] else "")
                 + ". The eval-mode attack, bf16 and "
                 f"channels_last rungs change the algorithm or the precision: "
                 f"[docs/performance.md](docs/performance.md#a-training-step-one-change-at-a-time)",
                 f"`{files[3]}`"])
    return table(["what", "result", "data"], rows)


def cheap_ascent(files):
    """The issue-18 study's tables, as scripts/cheap_ascent_study.py writes them."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("cheap_ascent_study",
                                                  os.path.join(ROOT, "scripts", "cheap_ascent_study.py"))
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    d = load(files[0])
    return study.markdown(d["summary"], d["seeds"], d["cpu_cost"])


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
            files = [f.strip() for f in m.group("files").split(",") if f.strip()]
            cur = (m.group("name"), files, i)
        elif line.strip() == END:
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    ap.add_argument("docs", nargs="*", default=DOCS)
    a = ap.parse_args(argv)
    problems = []
    for doc in a.docs:
        problems += process(doc, write=not a.check)
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
