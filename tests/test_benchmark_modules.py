"""Every benchmark module owns its output: it exports ``main``, ``summary_lines`` and ``targets``,
and both read back the committed result JSONs in benchmarks/results/ (found by the JSON's
``benchmark`` key or its file name, and the benchmark sections of the committed gpu_check.json
runs): the summary lines carry numbers of the JSON, the targets are a dict of targets. Nothing is
run; the modules are only imported."""
import glob
import json
import math
import os
import re
import sys

import pytest

from conftest import ROOT, load_source

BENCH_DIR = os.path.join(ROOT, "benchmarks")
RESULTS = os.path.join(BENCH_DIR, "results")
if BENCH_DIR not in sys.path:  # the modules import benchmarks/_bench_io.py by its bare name
    sys.path.insert(0, BENCH_DIR)

STEMS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(BENCH_DIR, "bench_*.py"))) + ["ddp_smoke"]
_MODULES = {}


def module(stem):
    if stem not in _MODULES:
        _MODULES[stem] = load_source(f"awpfast_benchmod_{stem}", f"benchmarks/{stem}.py")
    return _MODULES[stem]


def _source(stem):
    with open(os.path.join(BENCH_DIR, stem + ".py")) as f:
        return f.read()


def _owner(path, doc):
    """The module that wrote ``doc``: the one whose source names its ``benchmark`` key, else the
    one whose name (without ``bench_``) ends the file name, the longest such."""
    if isinstance(doc, dict) and doc.get("benchmark"):
        found = [s for s in STEMS if f'"benchmark": "{doc["benchmark"]}"' in _source(s)]
        if found:
            return found[0]
    name = os.path.basename(path)
    ends = [s for s in STEMS if name.endswith("_" + s[len("bench_"):] + ".json")]
    return max(ends, key=len) if ends else None


def _committed():
    """``(label, module stem, data)`` for every committed result a benchmark module reads."""
    gc = load_source("awpfast_gpu_check_for_modules", "benchmarks/gpu_check.py")
    out = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "**", "*.json"), recursive=True)):
        with open(path) as f:
            doc = json.load(f)
        rel = os.path.relpath(path, RESULTS)
        if isinstance(doc, dict) and "sections" in doc:  # a gpu_check run: one result per bench section
            for name in doc["sections"]:
                sec = gc.BY_NAME.get(name)
                res = gc.result(doc, name)
                if sec is not None and sec.kind == "bench" and res and sec.spec[0] in STEMS:
                    out.append((f"{rel}#{name}", sec.spec[0], res))
            continue
        stem = _owner(path, doc)
        if stem:
            out.append((rel, stem, doc))
    return out


COMMITTED = _committed()


def _numbers(doc):
    """Every number in ``doc`` (booleans excluded)."""
    if isinstance(doc, bool):
        return []
    if isinstance(doc, (int, float)):
        return [float(doc)] if math.isfinite(doc) else []
    if isinstance(doc, dict):
        return [v for x in doc.values() for v in _numbers(x)]
    if isinstance(doc, (list, tuple)):
        return [v for x in doc for v in _numbers(x)]
    return []


_TOKEN = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.(\d+))?(?:[eE]([-+]?\d+))?")


def _shown(line, values):
    """Whether ``line`` shows one of ``values`` (other than 0 and 1) as printed at its precision."""
    for m in _TOKEN.finditer(line):
        try:
            t = float(m.group(0).replace(",", ""))
        except ValueError:
            continue
        if t in (0.0, 1.0):
            continue
        dec = len(m.group(1) or "")
        if m.group(2) is not None:  # 1.3e-07: the mantissa's digits
            tol = 0.5 * 10 ** (int(m.group(2)) - dec)
        else:
            tol = 0.5 * 10 ** -dec
        if any(abs(v - t) <= tol * (1 + 1e-9) for v in values):
            return True
    return False


def test_the_results_are_found():
    owners = {stem for _, stem, _ in COMMITTED}
    # the committed CPU JSONs of these modules exist; losing one means the search above broke
    assert {"bench_continual", "bench_distributed", "bench_extra_data", "bench_family", "bench_compile",
            "bench_family_kernels", "bench_weight_side", "bench_train_step", "ddp_smoke"} <= owners


@pytest.mark.parametrize("stem", STEMS)
def test_module_exports(stem):
    mod = module(stem)
    for fn in ("main", "summary_lines", "targets"):
        assert callable(getattr(mod, fn, None)), f"{stem} has no {fn}"
    assert (mod.targets.__doc__ or "").strip(), f"{stem}.targets has no docstring"


@pytest.mark.parametrize("label,stem,data", COMMITTED, ids=[c[0] for c in COMMITTED])
def test_committed_result_read_back(label, stem, data):
    mod = module(stem)
    lines = mod.summary_lines(data)
    assert isinstance(lines, list) and lines, f"{stem}.summary_lines gave nothing for {label}"
    assert all(isinstance(s, str) and s.strip() for s in lines)
    values = _numbers(data)
    assert any(_shown(s, values) for s in lines), f"no number of {label} in {lines}"
    tg = mod.targets(data)
    assert isinstance(tg, dict)
    for k, tv in tg.items():
        assert isinstance(k, str) and {"value", "target", "ok"} <= set(tv), (k, tv)
        assert tv["ok"] in (True, False, None)


def test_every_gpu_check_benchmark_has_a_verdict():
    """gpu_check asks each benchmark section's module for ``verdict(result) -> (ok, rows not ok)``; a module
    without one would fail its section on the GPU machine, after the device time is spent."""
    gc = load_source("awpfast_gpu_check_for_verdicts", "benchmarks/gpu_check.py")
    for sec in gc.SECTIONS:
        if sec.kind == "bench":
            assert callable(getattr(module(sec.spec[0]), "verdict", None)), sec.name
    for label, stem, data in COMMITTED:
        if stem == "bench_seam_host":
            assert module(stem).verdict(data) == (True, []), label
            bad = dict(data, rows=[dict(data["rows"][0], group_us=float("nan"))] + data["rows"][1:])
            assert module(stem).verdict(bad)[0] is False
