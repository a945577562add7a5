"""Every measured number in the docs' prose is in the committed JSON its page names
(scripts/claims.py): the repository passes, and a number changed by hand is caught."""
import glob
import json
import os
import shutil

import pytest

from conftest import ROOT, load_source

claims = load_source("awpfast_claims", "scripts/claims.py")


def test_the_repository_passes():
    problems = claims.check(ROOT)
    assert not problems, "\n".join(problems)


def test_pending_pages_exist():
    # a PENDING entry names a real page and says what is missing; none hides a page that passes
    for page, why in claims.PENDING.items():
        assert os.path.exists(os.path.join(ROOT, page)), page
        assert why
        assert claims.check(ROOT, only=[page]), f"{page} passes now: remove it from PENDING"


def _tree(tmp_path):
    """A copy of the pages and of every committed JSON they may cite."""
    for pat in ("README.md", "docs/*.md", "benchmarks/**/README.md", "benchmarks/results/**/*.json", "docs/**/*.json"):
        for f in glob.glob(os.path.join(ROOT, pat), recursive=True):
            dst = tmp_path / os.path.relpath(f, ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
    return str(tmp_path)


def _edit(root, page, old, new):
    path = os.path.join(root, page)
    text = open(path, encoding="utf-8").read()
    assert text.count(old) == 1, (page, old)
    open(path, "w", encoding="utf-8").write(text.replace(old, new))


HAND_EDITS = [
    # (page, text, the same text with one measured number changed, the number the checker names)
    ("README.md", "with 20 % label", "with 23 % label", "23%"),
    ("docs/performance.md", "is 0.54 ms of kernel time (0.64 ms for one isolated call) in a", "is 0.54 ms of kernel time (0.66 ms for one isolated call) in a", "0.66ms"),
    ("docs/performance.md", "| awpfast `native` (`awpfast._C`, the CPU default) | **57.0** |", "| awpfast `native` (`awpfast._C`, the CPU default) | **56.0** |", "56.0"),
    ("docs/performance.md", "| 2 | `global` | 772 |", "| 2 | `global` | 779 |", "779"),
    ("docs/training.md", "19,562 img/s", "19,600 img/s", "19,600img/s"),
    ("benchmarks/README.md", "floor is 0.50 ms, next to 0.11 ms", "floor is 0.50 ms, next to 0.12 ms", "0.12ms"),
    ("benchmarks/results/2026-11-27_h100/README.md", "(45.8 ms) and awpfast (45.1 ms)", "(45.8 ms) and awpfast (44.1 ms)", "44.1ms"),
]


@pytest.mark.parametrize("page,old,new,token", HAND_EDITS, ids=[f"{e[0]}:{e[3]}" for e in HAND_EDITS])
def test_a_number_changed_by_hand_is_caught(tmp_path, page, old, new, token):
    root = _tree(tmp_path)
    assert claims.check(root, only=[page]) == []
    _edit(root, page, old, new)
    problems = claims.check(root, only=[page])
    assert len(problems) == 1 and f" {token} " in problems[0], problems


def test_code_and_generated_blocks_are_not_its_business(tmp_path):
    root = _tree(tmp_path)
    # a fenced code block, an inline code span, a generated numbers block (docs_numbers checks it)
    _edit(root, "README.md", "lr=0.1, momentum=0.9, weight_decay=5e-4)", "lr=0.3, momentum=0.7, weight_decay=6e-4)")
    _edit(root, "README.md", "`--awp-every K`", "`--awp-every 3.5`")
    _edit(root, "README.md", "| 57.0 ms against 189.6 ms", "| 58.0 ms against 199.6 ms")
    _edit(root, "docs/performance.md", "| preact18 | 16 | PGD-3 | 2-core CPU (x86_64) | 2 | 10 (1) | 13.31",
          "| preact18 | 16 | PGD-3 | 2-core CPU (x86_64) | 2 | 10 (1) | 14.31")
    assert claims.check(root, only=["README.md", "docs/performance.md"]) == []


def _page(tmp_path, text, data):
    (tmp_path / "docs").mkdir(exist_ok=True)
    for name, d in data.items():
        (tmp_path / name).write_text(json.dumps(d))
    (tmp_path / "docs" / "p.md").write_text(text)
    return claims.check(str(tmp_path), only=["docs/p.md"])


def test_the_rule(tmp_path):
    data = {"a.json": {"ms": 12.3456, "ratio": 1.304, "frac": 0.153, "s": 2.5, "cmd": "--gamma 0.01"}}
    ok = ("<!-- claims: a.json -->\nPGD-20 on CIFAR-10 with WRN-34-10 and ResNet-18 (§4, Figure 9, torch 2.13, "
          "Python ≥ 3.9, 2026-12-07, 8×8 images, eps 8/255, 200 epochs, 2 processes): 12.35 ms, 1.30×, "
          "15.3 %, 2500 ms, 2.5 s, γ = 0.01.\n\n```python\nx = 7.77\n```\n`9.99` and [link](x_1.5.md)\n")
    assert _page(tmp_path, ok, data) == []
    # each measured kind is checked
    for bad, tok in [("12.36 ms", "12.36ms"), ("1.31×", "1.31×"), ("15.4 %", "15.4%"), ("2600 ms", "2600ms"),
                     ("± 7", "7"), ("0.02", "0.02"), ("1,234", "1,234")]:
        problems = _page(tmp_path, ok.replace("γ = 0.01.", f"γ = 0.01, {bad}."), data)
        assert len(problems) == 1 and f" {tok} " in problems[0], (bad, problems)
    # no marker above a measured number
    assert "no claims marker" in _page(tmp_path, "It took 1.5 s.\n", data)[0]
    # a marker naming no file
    assert "no JSON file" in _page(tmp_path, "<!-- claims: nope.json -->\n", data)[0]
    # table cells are measured, integers included
    assert "(table)" in _page(tmp_path, "<!-- claims: a.json -->\n| a | b |\n|---|---|\n| x | 17 |\n", data)[0]


def test_not_measured_phrases_exempt_only_where_they_stand(tmp_path):
    data = {"a.json": {"x": 1.0}}
    text = "<!-- claims: a.json -->\n<!-- not-measured: threshold 1.7 -->\nA threshold 1.7 here; 1.7 there.\n"
    problems = _page(tmp_path, text, data)
    assert len(problems) == 1 and " 1.7 " in problems[0]
    stale = "<!-- claims: a.json -->\n<!-- not-measured: gone 4.2 -->\nnothing\n"
    assert "occurs nowhere" in _page(tmp_path, stale, data)[0]
    region = ("<!-- not-measured-region: settings -->\n| a | 3.5 |\n<!-- /not-measured-region -->\n")
    assert _page(tmp_path, region, data) == []
    assert "never closed" in _page(tmp_path, "<!-- not-measured-region: x -->\n| a | 3.5 |\n", data)[0]


def test_a_ratio_from_a_loaded_run_is_reported(tmp_path):
    data = {"loaded.json": {"loadavg": [13.3, 11.8, 8.6], "speedup": 1.26, "ms": 23.2},
            "quiet.json": {"loadavg_start": [2.1, 2.9, 3.3], "speedup": 1.30}}
    problems = _page(tmp_path, "<!-- claims: loaded.json -->\nawpfast is 1.26× faster (23.2 ms).\n", data)
    assert len(problems) == 1 and "load average" in problems[0] and "1.26×" in problems[0]
    assert _page(tmp_path, "<!-- claims: quiet.json -->\nawpfast is 1.30× faster.\n", data) == []
