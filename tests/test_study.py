"""The study runner's statistics and verdicts (scripts/study.py), and the docs blocks that are
computed from per-seed records (scripts/docs_numbers.py): Student-t quantiles against tabulated
values, the keeps / loses / undecided rules on synthetic seeds, pairing only within one machine,
records written and read back, and an edited per-seed number changing the generated tables."""
import copy
import json
import os

import pytest

from conftest import load_source

S = load_source("awpfast_study", "scripts/study.py")
D = load_source("awpfast_docs_numbers", "scripts/docs_numbers.py")


@pytest.mark.parametrize("p,df,want", [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 9, 2.2622),
                                       (0.95, 9, 1.8331), (0.95, 4, 2.1318), (0.975, 29, 2.0452)])
def test_t_quantiles_match_the_tables(p, df, want):
    assert S.t_quantile(p, df) == pytest.approx(want, abs=2e-4)
    assert S.t_quantile(1 - p, df) == pytest.approx(-want, abs=2e-4)


def test_paired_intervals():
    d = S.paired([1.0, 2.0, 3.0, 4.0])
    assert d["mean"] == 2.5 and d["sd"] == pytest.approx(1.2910, abs=1e-4)
    h = S.t_quantile(0.975, 3) * d["sd"] / 2
    assert d["ci95"] == pytest.approx([2.5 - h, 2.5 + h])
    assert S.paired([]) is None and "sd" not in S.paired([1.0])


def _metrics(v, aa, cpu="CPU A"):
    return {"last3_pgd20": v, "autoattack": aa, "last_pgd20": v, "heldout_pgd20": v, "best_val_test_pgd20": v,
            "last_clean": 80.0, "cpu_model": cpu, "torch": "2.13.0"}


def test_verdicts_keep_lose_undecided():
    seeds = range(10)
    per = {"AT": {s: _metrics(50.0 + (s % 3), 45.0 + (s % 2)) for s in seeds},
           "AWP": {s: _metrics(65.0 + (s % 3), 60.0 + (s % 2)) for s in seeds},
           "close": {s: _metrics(65.0 + (s % 3) - 0.1 * (s % 2), 60.0 + (s % 2)) for s in seeds},
           "far": {s: _metrics(60.0 + (s % 3), 55.0 + (s % 2)) for s in seeds},
           "noisy": {s: _metrics(65.0 + (s % 3) + (5.5 if s % 2 else -5.5), 60.0 + (s % 2) + (5.5 if s % 2 else -5.5))
                     for s in seeds}}

    def verdict(arm):
        ve = {k: S._paired(per, arm, "AWP", k) for k in S.METRICS}
        va = {k: S._paired(per, arm, "AT", k) for k in S.METRICS}
        return S.verdict(ve, va)
    assert verdict("close")["verdict"] == "keeps the gain"
    assert verdict("far")["verdict"] == "loses"
    v = verdict("noisy")
    assert v["verdict"] == "undecided" and v["seeds_needed"] > 10
    assert all(verdict(a)["final"] and verdict(a)["n"] == 10 for a in ("close", "far", "noisy"))


def test_a_verdict_before_ten_seeds_is_worded_as_interim():
    """Design brief section 13: >= 10 paired seeds for a verdict. Before that the same rule's outcome is
    worded "so far (n of 10)"; at 10 it is final; a pilot is worded by its promotion rule, whatever the
    equivalence rule says."""
    def per(n, gap):
        return {"AT": {s: _metrics(50.0 + (s % 3), 45.0 + (s % 2)) for s in range(n)},
                "AWP": {s: _metrics(65.0 + (s % 3), 60.0 + (s % 2)) for s in range(n)},
                "arm": {s: _metrics(65.0 + gap + (s % 3) + 0.3 * (s % 2), 60.0 + gap + (s % 2)) for s in range(n)}}

    def verdict(n, gap, pilot=False):
        p = per(n, gap)
        ve = {k: S._paired(p, "arm", "AWP", k) for k in S.METRICS}
        va = {k: S._paired(p, "arm", "AT", k) for k in S.METRICS}
        return S.verdict(ve, va, pilot=pilot)
    v = verdict(4, -5.0)
    assert (v["verdict"], v["n"], v["final"]) == ("loses", 4, False)
    assert S.verdict_words(v) == "loses so far (4 of 10 seeds)"
    v = verdict(10, -5.0)
    assert v["final"] and S.verdict_words(v) == "loses"
    v = verdict(3, -5.0, pilot=True)
    assert v["pilot_promotion"] is False and not v["final"]
    assert S.verdict_words(v) == ("pilot, 3 seeds: more than 2 points below exact AWP, not promoted "
                                  "(the rule at n = 3: loses)")
    v = verdict(3, -1.5, pilot=True)
    assert v["pilot_promotion"] is True and S.verdict_words(v).startswith(
        "pilot, 3 seeds: within 2 points of exact AWP: promote it to 10 seeds")
    v = verdict(10, -0.1, pilot=True)  # a pilot's rule outcome never reads as a final verdict
    assert not v["final"] and S.verdict_words(v).startswith("pilot, 10 seeds")
    u = dict(verdict(4, -5.0), verdict="undecided", seeds_needed=12)
    assert S.verdict_words(u) == "undecided so far (4 of 10 seeds; about 12 would decide)"
    assert S.verdict_words(dict(u, n=10, final=True)) == "undecided (about 12 seeds would decide)"


def test_pairs_only_within_one_machine():
    per = {"AT": {0: _metrics(50, 45), 1: _metrics(51, 46, cpu="CPU B")},
           "AWP": {0: _metrics(60, 55), 1: _metrics(61, 56)}}
    d = S._paired(per, "AWP", "AT", "last3_pgd20")
    assert d["seeds"] == [0] and d["n"] == 1


def test_seeds_needed_grows_with_spread():
    assert S.seeds_needed(0.0, 1.0) < S.seeds_needed(0.0, 3.0)
    assert S.seeds_needed(-3.0, 1.0) == 4  # -3 + t(0.975, 3) / 2 = -1.41 < -1; with 3 seeds -0.52


def _fake_run(d, arm, seed, base):
    os.makedirs(d, exist_ok=True)
    hist = []
    for e in range(1, 201):
        r = {"epoch": e, "lr": 0.05, "train_loss": 1.0, "train_time_s": 1.0, "val_robust_acc": 0.5,
             "test_robust_acc": base if e % 5 == 0 else None, "test_clean_acc": base + 0.2 if e % 5 == 0 else None,
             "train_robust_acc": 0.7 if e % 5 == 0 else None, "awp_gamma": 0.01}
        if arm != "AT" and e > 10:
            r["awp_cosine_mean"] = 0.9
        hist.append(r)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(h) + "\n" for h in hist))
    with open(os.path.join(d, "study_run.json"), "w") as f:
        json.dump({"arm": arm, "seed": seed, "cpu_model": "CPU A", "torch": "2.13.0"}, f)
    ev = {"split": "x", "n": 500, "clean_acc": base + 0.2, "pgd20_acc": base, "autoattack_acc": base - 0.05}
    with open(os.path.join(d, "final_eval.json"), "w") as f:
        json.dump({"heldout": dict(ev, n=1377), "test": ev}, f)
    import torch
    torch.save({"best": {"epoch": 100, "test_robust_acc": base + 0.01}}, os.path.join(d, "last.pt"))


def test_collect_and_summarize_round_trip(tmp_path):
    runs, records = str(tmp_path / "runs"), str(tmp_path / "records")
    for s in range(3):
        _fake_run(os.path.join(runs, f"AT-s{s}"), "AT", s, 0.50 + 0.01 * s)
        _fake_run(os.path.join(runs, f"AWP-s{s}"), "AWP", s, 0.60 + 0.02 * s)
    written = S.collect(runs, records)
    assert len(written) == 6 and S.collect(runs, records) == []  # a record is written once
    sm = S.summarize(records)
    va = sm["arms"]["AWP"]["vs_AT"]["last3_pgd20"]
    assert va["n"] == 3 and va["values"] == pytest.approx([10.0, 11.0, 12.0])
    assert sm["arms"]["AWP"]["metrics"]["cosine"]["mean"] == pytest.approx(0.9)
    assert sm["arms"]["AWP"]["metrics"]["autoattack"]["mean"] == pytest.approx(57.0)
    text = S.markdown(sm)
    assert "exact AT-AWP (gamma 0.01)" in text and "+11.0" in text


def test_the_study_blocks_recompute_from_the_records(tmp_path, monkeypatch):
    runs, records = str(tmp_path / "runs"), str(tmp_path / "docs" / "study" / "records")
    for s in range(2):
        _fake_run(os.path.join(runs, f"AT-s{s}"), "AT", s, 0.50)
        _fake_run(os.path.join(runs, f"AWP-s{s}"), "AWP", s, 0.60 + 0.01 * s)
    S.collect(runs, records)
    monkeypatch.setattr(D, "ROOT", str(tmp_path))
    before = D.readme_study(["docs/study/records"])
    assert "n = 2" in before and "+10.5" in before
    f = os.path.join(records, "AWP-s1.json")
    rec = json.load(open(f))
    for r in rec["history"]:
        if r.get("test_robust_acc") is not None:
            r["test_robust_acc"] = 0.70
    json.dump(rec, open(f, "w"))
    after = D.readme_study(["docs/study/records"])
    assert after != before and "+15.0" in after


def test_the_cheap_ascent_history_block_recomputes_from_its_per_seed_rows(tmp_path, monkeypatch):
    src = json.load(open(os.path.join(D.ROOT, "docs", "reproduction_cheap_ascent.json")))
    d = copy.deepcopy(src)
    os.makedirs(tmp_path / "docs")
    json.dump(d, open(tmp_path / "docs" / "x.json", "w"))
    monkeypatch.setattr(D, "ROOT", str(tmp_path))
    before = D.cheap_ascent(["docs/x.json"])
    d["runs"]["attack-sourced"]["0"]["last_pgd20"] += 5.0   # an edited run (the summary in the file kept)
    json.dump(d, open(tmp_path / "docs" / "x.json", "w"))
    assert D.cheap_ascent(["docs/x.json"]) != before




def _record(val_clean, final_clean):
    """A minimal committed record: validation clean accuracy per epoch (200 epochs), test every 5."""
    h = [{"epoch": e, "val_clean_acc": v, "train_time_s": 1.0, "test_robust_acc": 0.5 if e % 5 == 0 else None,
          "test_clean_acc": (final_clean if e == 200 else 0.9) if e % 5 == 0 else None}
         for e, v in enumerate(val_clean, 1)]
    ev = {"n": 500, "pgd20_acc": 0.5, "autoattack_acc": 0.4}
    return {"history": h, "best": {"epoch": 100, "test_robust_acc": 0.5}, "final_eval": {"heldout": ev, "test": ev},
            "machine": {"cpu_model": "CPU A", "torch": "2.13.0"}}


def test_the_onset_dip_and_runs_that_end_at_chance():
    """The lowest validation clean accuracy of the ten epochs after AWP turns on, and the epoch from which a
    run that ends at chance stayed there (validation clean <= 20 % in every later epoch)."""
    fell = [0.8] * 12 + [0.1] * 188
    m = S.run_metrics(_record(fell, 0.09))
    assert m["onset_val_clean_min"] == pytest.approx(10.0) and m["chance_from"] == 13
    recovered = [0.8] * 11 + [0.1] + [0.9] * 188
    m = S.run_metrics(_record(recovered, 0.95))
    assert m["onset_val_clean_min"] == pytest.approx(10.0) and m["chance_from"] is None
    late = [0.8] * 12 + [0.1] * 137 + [0.3] + [0.1] * 50  # one epoch above chance at 150
    assert S.run_metrics(_record(late, 0.1))["chance_from"] == 151
    # before AWP (epochs 1-10) does not count as the onset
    early = [0.1] * 10 + [0.7] * 190
    assert S.run_metrics(_record(early, 0.9))["onset_val_clean_min"] == pytest.approx(70.0)


def test_status_counts_the_runs_left_and_estimates_their_time(tmp_path, capsys):
    """status: seeds by state per arm, the runs left, and hours from each arm's median finished wall time
    (an arm with none finished counts at the median over all arms), divided by --jobs."""
    runs = str(tmp_path)
    for arm, seed, wall in (("AT", 50, 1800.0), ("AT", 51, 3600.0), ("AWP", 50, 7200.0)):
        d = os.path.join(runs, f"{arm}-s{seed}")
        os.makedirs(d)
        json.dump({"wall_s": wall - 600.0, "eval_wall_s": 600.0}, open(os.path.join(d, "study_run.json"), "w"))
        open(os.path.join(d, "final_eval.json"), "w").write("{}")
    d = os.path.join(runs, "AWP-s51")  # resumed: its wall_s is its last sitting's only, not counted
    os.makedirs(d)
    json.dump({"wall_s": 60.0, "eval_wall_s": 0.0, "resumed_from_epoch": 190}, open(os.path.join(d, "study_run.json"), "w"))
    open(os.path.join(d, "final_eval.json"), "w").write("{}")
    S.status([50, 51, 52], ["AT", "AWP", "every2"], runs, jobs=2)
    out = capsys.readouterr().out
    assert "AT             done: 50 51  new: 52" in out
    # left: AT 1 x median(0.5 h, 1 h) = 0.75 h; AWP 1 x 2 h; every2 3 x median(0.5, 1, 2) = 3 h -> 5.75 h / 2 jobs
    assert "4 of 9 runs done, 5 left; about 2.9 h more at --jobs 2" in out
