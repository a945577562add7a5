"""The docs' numbers come from committed JSON.

* every ``<!-- numbers: NAME (FILE.json) -->`` block of docs/reproduction.md, README.md and
  docs/performance.md is exactly what ``scripts/docs_numbers.py`` generates from its JSON
  (same rounding), and every hand-written settings block holds only numbers of its JSON;
* no markdown table of docs/reproduction.md, nor README.md's results table, lies outside a block;
* the generators themselves: paired statistics, the landscape's alpha lookup (the old table read
  alpha = +-0.6 for +-0.5), the detrended flatness correlations, on small hand-made inputs;
* the one settings number that no JSON holds (flipped labels among the flatness / gap images)
  is recomputed from the data.
"""
import json
import math
import os

import pytest

from conftest import ROOT, load_source

dn = load_source("awpfast_docs_numbers", "scripts/docs_numbers.py")


@pytest.mark.parametrize("doc", dn.DOCS)
def test_blocks_match_their_json(doc):
    text = open(os.path.join(ROOT, doc)).read()
    assert dn.blocks(text), f"{doc} has no numbers block"
    problems = dn.process(doc, write=False)
    assert not problems, "\n".join(problems) + "\n(run: python scripts/docs_numbers.py)"


def test_the_study_summary_json_is_current():
    # docs/study.json is recomputed from the committed records, like the tables
    assert dn.study_json(write=False) == [], "run: python scripts/docs_numbers.py"
    summary = json.load(open(os.path.join(ROOT, dn.STUDY_JSON)))
    assert {a: len(e["seeds"]) for a, e in summary["arms"].items()} == {
        a: len(e["seeds"]) for a, e in dn._study().summarize().get("arms", {}).items()}


def test_an_edited_study_summary_is_caught(tmp_path, monkeypatch):
    summary = json.load(open(os.path.join(ROOT, dn.STUDY_JSON)))
    summary["arms"]["AWP"]["metrics"]["last3_pgd20"]["mean"] += 0.01
    (tmp_path / "docs").mkdir()
    (tmp_path / dn.STUDY_JSON).write_text(json.dumps(summary, indent=1))
    monkeypatch.setattr(dn, "ROOT", str(tmp_path))
    assert dn.study_json(write=False) == [f"{dn.STUDY_JSON}: not the summary of docs/study/records"]


def test_same_json_forgives_the_last_bits_only():
    assert dn._same_json({"a": [1.0, 2, None, "x"]}, {"a": [1.0 + 1e-13, 2, None, "x"]})
    assert not dn._same_json({"a": 66.7}, {"a": 66.70001})
    assert not dn._same_json({"a": 1.0}, {"b": 1.0})
    assert not dn._same_json([1.0], [1.0, 2.0])
    assert not dn._same_json({"a": 1.0}, {"a": "1.0"})


def test_no_table_outside_a_block():
    assert dn.tables_outside_blocks("docs/reproduction.md") == []
    if "README.md" in dn.DOCS:
        assert dn.tables_outside_blocks("README.md", only_after="## Results", only_before="## ") == []


def test_a_changed_number_is_caught(tmp_path):
    text = open(os.path.join(ROOT, "docs/reproduction.md")).read()
    assert "| 3.9 ± 0.7 | 9.54 |" in text
    bad = text.replace("| 3.9 ± 0.7 | 9.54 |", "| 4.0 ± 0.7 | 9.54 |")
    _, problems = dn.render(bad, "x.md")
    assert len(problems) == 1 and "regime-paired" in problems[0] and "4.0 ± 0.7" in problems[0]
    fixed, _ = dn.render(bad, "x.md")
    assert fixed == text
    # a settings number that its JSON does not hold
    bad = text.replace("**320 training images**", "**330 training images**")
    _, problems = dn.render(bad, "x.md")
    assert len(problems) == 1 and "330" in problems[0]
    # markers must pair up
    with pytest.raises(ValueError):
        dn.blocks("<!-- numbers: landscape (a.json) -->\n| x |\n")


def test_paired_statistics():
    m, sd, t = dn.mean_sd_t([3.8, 4.6, 3.2])
    assert m == pytest.approx(3.8667, abs=1e-4) and sd == pytest.approx(0.7024, abs=1e-4)
    assert t == pytest.approx(m / (sd / math.sqrt(3)))
    d = json.load(open(os.path.join(ROOT, "docs/reproduction_regime.json")))
    m, sd, t = dn.paired_best(d, "AT-AWP g0.01")
    assert f"{m:.1f} {t:.1f}" == "3.9 9.5"  # the numbers the study reported


def test_landscape_reads_the_alpha_asked_for():
    alphas = [-1.0, -0.5, 0.0, 0.5000000000000001, 1.0]
    d = {"alphas": alphas, "checkpoints": [
        {"label": "A", "loss": [[5.0, 2.0, 1.0, 3.0, 6.0], [7.0, 4.0, 1.0, 5.0, 8.0]]},
        {"label": "B", "loss": [[3.0, 1.5, 1.0, 2.0, 4.0], [3.0, 1.5, 1.0, 2.0, 4.0]]}]}
    a, b = dn.landscape_one(d)
    assert a["loss0"] == 1.0 and a["rise"][-0.5] == 2.0 and a["rise"][0.5] == 3.0 and a["rise"][1.0] == 6.0
    assert b["rise"][-1.0] == 2.0
    # B's rise against A's at -1, -0.5, 0.5, 1: 2/5, 0.5/2, 1/3, 3/6 smaller by 60, 75, 66.7, 50 %
    assert b["smaller_min"] == pytest.approx(50.0) and b["smaller_max"] == pytest.approx(75.0)
    with pytest.raises(ValueError):
        dn._rise(d["checkpoints"][0], alphas, 0.6)


def test_detrended_flatness_correlations():
    # both series follow the epoch exactly (r = 1 with it) but their changes alternate against each other
    e = list(range(1, 11))
    f = {"epochs": e, "flatness": [x + (0.3 if x % 2 else 0.0) for x in e],
         "robust_gap": [x + (0.0 if x % 2 else 0.3) for x in e]}
    s = dn.flatness_stats(f)
    assert s["pearson"] > 0.98 and s["r_changes"] == pytest.approx(-1.0)
    assert s["partial_epoch"] < 0


def test_flipped_labels_among_the_first_200_training_images():
    """docs/reproduction.md: 37 of the 200 images of the gap's training side (and of the flatness
    runs) carry flipped labels in the regime (320 digits, 100 held out, 20 % noise)."""
    from awpfast.data import load_dataset, training_splits
    d = json.load(open(os.path.join(ROOT, "docs/reproduction_regime.json")))
    argv = d["regime"]
    opt = {argv[i]: argv[i + 1] for i in range(0, len(argv) - 1) if argv[i].startswith("--")}
    ds = load_dataset("digits", image_size=int(opt["--image-size"]))
    n, lim = int(opt["--train-samples"]), int(opt["--train-eval-samples"])
    clean, _ = training_splits(ds, 100, n, 0.0)
    noisy, _ = training_splits(ds, 100, n, float(opt["--label-noise"]))
    assert int((clean.y[:lim] != noisy.y[:lim]).sum()) == 37
    assert "37 of them are flipped" in open(os.path.join(ROOT, "docs/reproduction.md")).read()


def test_help_of_the_cheap_ascents_is_generated():
    """awpfast-train --help's measured costs and accuracies are awpfast/train/measured.py's generated sentences
    (checked against the JSON above); the rest of those options' help holds no measured number."""
    from awpfast.train import config, measured
    helps = {o.dest: o.kw["help"] for o in config.OPTIONS}
    uses = {"awp_ascent": ("attack", "attack-evalbn", "momentum"), "awp_every": ("every2",),
            "awp_ascent_fraction": ("sub0.25",), "awp_rule": ("rwp",)}
    assert set(measured.MEASURED) == {a for arms in uses.values() for a in arms}
    for dest, arms in uses.items():
        rest = helps[dest]
        for arm in arms:
            sentence = measured.measured(arm)
            assert sentence in rest, (dest, arm)
            rest = rest.replace(sentence, "")
        # what is left may name settings (K = 2, F = 0.25, 1: every step), never a measurement
        assert dn.numbers_in(rest) <= {0.25, 1.0, 2.0, 2020.0, 2022.0}, (dest, dn.numbers_in(rest))
    # the sentence follows its JSON: an edited cost changes it
    text = open(os.path.join(ROOT, "awpfast/train/measured.py")).read()
    bad = text.replace("costs 0.", "costs 9.", 1)
    assert bad != text
    _, problems = dn.render(bad, "measured.py")
    assert len(problems) == 1 and "ascent-help" in problems[0]


def test_the_help_names_the_runs_that_ended_at_chance():
    d = {"mean": -20.0, "n": 3, "ci95": [-90.0, 50.0]}
    entry = {"seeds": [0, 1, 2], "at_chance": {"0": 15}, "vs_exact": {"base": "AWP", "last3_pgd20": d, "autoattack": d},
             "verdict": {"verdict": "undecided", "seeds_needed": 16, "n": 3, "final": False,
                         "pilot_promotion": None}}
    text = dn._accuracy_help(entry)
    assert text.startswith("robust accuracy against exact AWP (the study): undecided so far (3 of 10 seeds; "
                           "about 16 would decide); last-3 PGD-20 -20.0 [95 % CI")
    assert text.endswith("; 1 of 3 runs ended at chance accuracy (seed 0 from epoch 15)")
    assert "chance" not in dn._accuracy_help(dict(entry, at_chance={}))


def test_the_headline_names_collapsed_runs_and_the_median():
    sm = {"arms": {"AWP": {"at_chance": {"5": 26, "7": 30}}, "AT": {"at_chance": {}}}}
    text = dn._chance_clause(sm, ["0", "1", "5"], [15.0, 13.0, -45.0])
    assert text == (". Runs that ended at chance accuracy: AT-AWP 1 of 3 (seed 5 from epoch 26), AT 0 of 3; the "
                    "median paired difference is +13.0 points, and with a collapsed run the t interval describes "
                    "no seed")
    assert dn._chance_clause({"arms": {"AWP": {"at_chance": {"7": 30}}, "AT": {}}}, ["0", "1"], [1.0, 2.0]) == ""
