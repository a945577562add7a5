"""The README's and the docs' snippets work as written (the docs split too).

Every ```python block of README.md and of each docs/*.md runs as printed. Each page is its own
session: its blocks run in order in one namespace, the way a reader pasting that page's blocks
into one Python session would run them (a later block may use names an earlier block of the
same page defined, never names of another page). There is no hidden prelude; the one
exception is ``READER_DATA`` below: a name a page explicitly leaves to the reader (their own
data), supplied here so that the rest of its block runs.

A block preceded by the line ``<!-- readme-test: skip REASON -->`` is skipped with that reason
(for snippets that need optional packages, hardware or several processes). The blocks run with
the environment ``torchrun --nproc_per_node 1`` would set (``RANK=0``, ``WORLD_SIZE=1``,
``MASTER_ADDR``/``MASTER_PORT``), so that docs/distributed.md's ``init_process_group`` works
on one process; a process group left open by a page is destroyed when its last block has run.

The ``awpfast-train`` / ``python -m awpfast.train`` / ``python -m awpfast.evaluate`` /
``python -m awpfast.landscape`` command lines of the ```sh and ```bash blocks are parsed (not
run) by the real argument parsers, so that every option the pages show exists. Relative links
between the pages must point at files that exist.
"""
import glob
import importlib
import os
import re
import shlex

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
_SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*(.*?)\s*-->")

# Names a page leaves to the reader's own data (and says so), per page. Nothing else is predefined.
READER_DATA = {
    # "for t, (x_task, y_task) in enumerate(my_tasks):  # your own stream": two small tasks of
    # 64-feature inputs (the size of mlp(64)) and 10 classes.
    "docs/continual.md": {"my_tasks": lambda: [(torch.rand(20, 64), torch.randint(0, 10, (20,))) for _ in range(2)]},
}


def _blocks(page, langs):
    """``[(line_number, code, skip_reason_or_None)]`` for ``page``'s fenced blocks of ``langs``."""
    lines = open(os.path.join(ROOT, page), encoding="utf-8").read().splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() in tuple(f"```{lang}" for lang in langs):
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            m = _SKIP.search(prev)
            out.append((i + 1, "\n".join(lines[i + 1:j]) + "\n", m.group(1) if m else None))
            i = j
        i += 1
    return out


PY_BLOCKS = {page: _blocks(page, ("python",)) for page in PAGES}
CASES = [(page, k) for page in PAGES for k in range(len(PY_BLOCKS[page]))]
_state = {}


def _page_state(page):
    if page not in _state:
        ns = {"__name__": "__readme__"}
        ns.update({name: make() for name, make in READER_DATA.get(page, {}).items()})
        _state[page] = {"ns": ns, "done": 0}
    return _state[page]


def _close_process_group():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module", autouse=True)
def _one_process_torchrun_env():
    from _dist_launch import free_port
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", str(port))):
            mp.setenv(k, v)
        yield
        _close_process_group()


def _exec(page, line, code):
    exec(compile(code, f"{page}:{line}", "exec"), _page_state(page)["ns"])


def _run_through(page, k):
    """Run ``page``'s blocks before ``k`` (once), so that a block can be run alone with -k."""
    st = _page_state(page)
    while st["done"] < k:
        line, code, skip = PY_BLOCKS[page][st["done"]]
        st["done"] += 1
        if skip is None:
            _exec(page, line, code)


def _wrappers(ns):
    """The awpfast wrappers (AWP, SAM, BoxAWP, ...) a page's session holds."""
    return [v for v in ns.values() if hasattr(v, "is_perturbed") and callable(getattr(v, "perturb", None))]


@pytest.mark.parametrize("page,k", CASES, ids=[f"{p}:{PY_BLOCKS[p][k][0]}" for p, k in CASES])
def test_python_block_runs_as_printed(page, k):
    line, code, skip = PY_BLOCKS[page][k]
    st = _page_state(page)
    last = k == len(PY_BLOCKS[page]) - 1
    try:
        if skip is not None:
            pytest.skip(f"{page}:{line}: {skip}")
        torch.manual_seed(0)
        if st["done"] > k:  # already run (as a prerequisite of a later block): rerun alone would repeat state
            return
        _run_through(page, k)
        st["done"] = k + 1
        _exec(page, line, code)
        for w in _wrappers(st["ns"]):  # no snippet leaves the weights perturbed
            assert not w.is_perturbed, f"{page}:{line} leaves {type(w).__name__} perturbed"
    finally:
        if last:
            _close_process_group()


def test_every_page_has_runnable_snippets():
    assert "README.md" in PAGES and len(PAGES) > 1
    text = "".join(code for _, code, _ in PY_BLOCKS["README.md"])
    assert len(PY_BLOCKS["README.md"]) >= 3
    assert "awpfast.AWP(" in text and "awp.perturb(" in text and "awp.step()" in text
    assert "attack(model, x, y)" not in text  # the old, wrong call shape
    for page in ("docs/training.md", "docs/distributed.md", "docs/family.md", "docs/landscape.md"):
        assert page in PAGES and any(skip is None for _, _, skip in PY_BLOCKS[page]), page
    dist_code = "".join(code for _, code, _ in PY_BLOCKS["docs/distributed.md"])
    assert "init_process_group" in dist_code and "DistributedDataParallel" in dist_code


def test_readme_usage_trains():
    """The README's loop changed the weights and left AWP unperturbed, BatchNorm sane."""
    _run_through("README.md", len(PY_BLOCKS["README.md"]))
    ns = _page_state("README.md")["ns"]
    model, awp = ns["model"], ns["awp"]
    assert awp.perturb_count >= 1 and not awp.is_perturbed
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _anchors(path):
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces to -)."""
    out = set()
    for ln in open(path, encoding="utf-8").read().splitlines():
        m = re.match(r"#{1,6}\s+(.*)", ln)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_readme_links_every_docs_page_and_links_resolve():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for page in PAGES[1:]:
        assert f"]({page})" in readme, f"README.md does not link {page}"
    for page in PAGES:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), file)) if file else os.path.join(ROOT, page)
            assert os.path.exists(path), f"{page}: broken link {target}"
            if anchor and path.endswith(".md"):
                assert anchor in _anchors(path), f"{page}: link {target}: no such heading"


def _parser(module):
    """The argument parser of ``module`` (train, evaluate, landscape)."""
    if module == "train":
        mod = importlib.import_module("awpfast.train")
        build = getattr(mod, "build_parser", None)
        if build is None:  # awpfast.train as a package: the parser lives in its config module
            build = importlib.import_module("awpfast.train.config").build_parser
        return build()
    return importlib.import_module(f"awpfast.{module}").build_parser()


def _commands():
    """(page, line, module, argv) of each awpfast-train / awpfast.{train,evaluate,landscape} command in sh/bash blocks."""
    cmds = []
    for page in PAGES:
        for line, code, _ in _blocks(page, ("sh", "bash")):
            text = re.sub(r"\\\n", " ", code)
            for ln in text.splitlines():
                ln = ln.split(" #", 1)[0].strip()
                if not ln:
                    continue
                words = shlex.split(ln)
                if len(words) > 1 and words[-1] == "..." and not words[-2].startswith("-"):
                    words.pop()  # "..." standing for more options (not the value of an option)
                for i, w in enumerate(words):
                    if w.endswith("awpfast-train"):
                        cmds.append((page, line, "train", words[i + 1:]))
                        break
                    if i > 0 and words[i - 1] == "-m" and w in ("awpfast.train", "awpfast.evaluate", "awpfast.landscape"):
                        cmds.append((page, line, w.split(".", 1)[1], words[i + 1:]))
                        break
    return cmds


def test_command_lines_parse():
    cmds = _commands()
    for module in ("train", "evaluate", "landscape"):
        assert any(m == module for _, _, m, _ in cmds), module
    assert any(p == "README.md" for p, _, _, _ in cmds)
    for page, line, module, argv in cmds:
        if module == "landscape":  # as awpfast.landscape.main does: "--alphas -1:1:21" glued to its flag
            argv = [f"--alphas={argv[i + 1]}" if w == "--alphas" and argv[i + 1].startswith("-") else w
                    for i, w in enumerate(argv) if not (i > 0 and argv[i - 1] == "--alphas" and w.startswith("-"))]
        try:
            _parser(module).parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page}:{line}: {module} does not accept {' '.join(argv)}")
