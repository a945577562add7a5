"""The house: imports flow down (design brief section 11), no import circle anywhere in awpfast.

The import graph is read from the sources (``import`` / ``from ... import`` anywhere in a module,
function-level ones included), except a module-level ``__getattr__`` that keeps an old import path
alive (``awpfast.optim.AWP``) and ``TYPE_CHECKING`` blocks, which import nothing at run time."""
import ast
import os

import pytest

import awpfast

ROOT = os.path.dirname(awpfast.__file__)

FLOORS = [  # top down: a module may import its own floor or lower ones, never a higher one
    {"train", "demo"},
    {"landscape", "evaluate", "integrations"},
    {"models", "rules"},
    {"data", "checkpoint", "optim", "extra_data", "ascent"},
    {"continual", "attacks", "perturb", "cli"},
    {"ops", "losses", "distributed", "compiled"},
    {"errors", "choices", "_lazy"},
]


def _modules():
    mods = {}
    for dp, _, fs in os.walk(ROOT):
        for f in fs:
            if f.endswith(".py"):
                p = os.path.join(dp, f)
                rel = os.path.relpath(p, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                mods[rel[:-9] if rel.endswith(".__init__") else rel] = p
    return mods


def _skipped(tree):
    """Nodes whose imports do not count: module-level ``__getattr__`` and ``if TYPE_CHECKING:``."""
    out = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            out.update(map(id, ast.walk(node)))
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(map(id, ast.walk(node)))
    return out


def import_graph():
    mods = _modules()
    edges = {}
    for m, p in mods.items():
        pkg = p.endswith("__init__.py")
        tree = ast.parse(open(p).read())
        skip = _skipped(tree)
        out = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = m.split(".") if pkg else m.split(".")[:-1]
                    parts = parts[:len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for a in node.names:
                    cand = f"{base}.{a.name}"
                    out.add(cand if cand in mods else base)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
        edges[m] = {o for o in out if o in mods and o != m and o != "awpfast"}
    return edges


def _top(m):
    return m.split(".")[1] if m.count(".") else None


def test_no_import_circle():
    edges = import_graph()
    state, path, cycles = {}, [], []

    def visit(u):
        state[u] = 1
        path.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == 1:
                cycles.append(path[path.index(v):] + [v])
            elif v not in state:
                visit(v)
        path.pop()
        state[u] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_flow_down():
    level = {name: i for i, floor in enumerate(FLOORS) for name in floor}
    edges = import_graph()
    tops = {_top(m) for m in edges if _top(m)}
    assert tops <= set(level), f"modules on no floor: {sorted(tops - set(level))}"
    up = [(a, b) for a, bs in edges.items() for b in bs
          if _top(a) and _top(b) and _top(a) != _top(b) and level[_top(b)] < level[_top(a)]]
    assert not up, "imports going up a floor: " + ", ".join(f"{a} -> {b}" for a, b in sorted(up))


def test_train_layers():
    """config builds and validates, loop runs, report reports: the loop never reaches for the parser,
    config never for the loop, report for neither; evaluate and landscape never import train."""
    edges = import_graph()
    assert "awpfast.train.loop" not in edges["awpfast.train.config"]
    assert not {"awpfast.train.config", "awpfast.train.loop"} & edges["awpfast.train.report"]
    loop_src = open(os.path.join(ROOT, "train", "loop.py")).read()
    assert "import build_parser" not in loop_src and "build_parser(" not in loop_src
    for m in ("awpfast.evaluate", "awpfast.landscape", "awpfast.checkpoint", "awpfast.cli"):
        assert not any(e.startswith("awpfast.train") for e in edges[m]), m
    assert edges["awpfast.errors"] == set()


def test_no_compatibility_aliases_at_0x():
    """Each name has one home: the rules in awpfast.rules (one module each), the engine in awpfast.optim."""
    import importlib
    from awpfast.optim import WeightPerturbation
    from awpfast.rules import SAM, AWP, BoxAWP
    assert AWP is awpfast.AWP and SAM is awpfast.SAM and BoxAWP is awpfast.BoxAWP
    assert issubclass(AWP, WeightPerturbation)
    assert AWP.__module__ == "awpfast.rules.awp" and SAM.__module__ == "awpfast.rules.sam"
    assert BoxAWP.__module__ == "awpfast.rules.box"
    with pytest.raises(ImportError):
        importlib.import_module("awpfast.family")
    with pytest.raises(ImportError):
        from awpfast.optim import AWP as _  # noqa: F401
    assert not hasattr(importlib.import_module("awpfast.landscape"), "CLIError")  # its errors are awpfast.errors.UsageError


def test_bad_command_line_is_answered_before_torch_is_imported():
    """``awpfast-train`` checks its options before importing torch (seconds on a loaded machine)."""
    import subprocess
    import sys
    code = ("import sys, awpfast.train as T; rc = T.main(['--epochs', '-1', '--quiet']); "
            "print(rc, 'torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["2", "False"], (p.stdout, p.stderr)
    assert p.stderr.strip() == "awpfast-train: error: --epochs must be an integer >= 1, got -1"


def test_no_issue_numbers_in_code_headings_or_test_names():
    """Work-tracking numbers (the word issue and a number) say nothing to a reader of the code or the docs: none in the
    sources, the test names or the markdown headings (an upstream project's issue, named as such, is
    a reference and may stay)."""
    import re
    import subprocess
    repo = os.path.dirname(ROOT)
    try:
        files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.cu", "*.cpp", "*.h", "*.inc"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (an installed package): the sources are checked in the repository")
    pat = re.compile(r"\bissue ?#?\d+", re.I)
    bad = []
    for f in files:
        if f.startswith(("benchmarks/results/", "docs/study/records/")):
            continue  # committed measurements: their notes are part of the record
        with open(os.path.join(repo, f), encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                code = not f.endswith(".md")
                if (code or line.startswith("#")) and pat.search(line) and "pytorch issue" not in line.lower():
                    bad.append(f"{f}:{i}: {line.strip()[:80]}")
    assert not bad, "issue numbers in code or headings:\n" + "\n".join(bad)
