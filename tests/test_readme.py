"""The README's usage works as written (issue 13, point 7).

Every ```python block of README.md runs as printed, in order, in one shared namespace: the way a
reader pasting the blocks into one Python session would run them (a later block may use names
an earlier block defined, never names the README does not define). There is no hidden prelude.
A block preceded by the line ``<!-- readme-test: skip REASON -->`` is skipped with that reason
(for snippets that need hardware or several processes); none is today. The blocks run with the
environment ``torchrun --nproc_per_node 1`` would set (``RANK=0``, ``WORLD_SIZE=1``,
``MASTER_ADDR``/``MASTER_PORT``), so that the Multi-GPU block's ``init_process_group`` works on
one process; the process group is destroyed afterwards.

The ``awpfast-train`` / ``python -m awpfast.evaluate`` command lines of the ```sh blocks are
parsed by the real argument parsers, so that every option the README shows exists.
"""
import os
import re
import shlex

import pytest
import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
_SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*(.*?)\s*-->")


def _blocks(lang):
    """``[(line_number, code, skip_reason_or_None)]`` for the README's fenced blocks of ``lang``."""
    lines = open(README, encoding="utf-8").read().splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == f"```{lang}":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            m = _SKIP.search(prev)
            out.append((i + 1, "\n".join(lines[i + 1:j]) + "\n", m.group(1) if m else None))
            i = j
        i += 1
    return out


PY_BLOCKS = _blocks("python")
_state = {"ns": {"__name__": "__readme__"}, "done": 0}


@pytest.fixture(scope="module", autouse=True)
def _one_process_torchrun_env():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", str(port))):
            mp.setenv(k, v)
        yield
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_readme_has_the_usage_snippets():
    text = "".join(code for _, code, _ in PY_BLOCKS)
    assert len(PY_BLOCKS) >= 3
    assert "awpfast.AWP(" in text and "awp.perturb(" in text and "awp.step()" in text
    assert "attack(model, x, y)" not in text  # the old, wrong call shape


def _run_through(k):
    """Run the blocks before ``k`` (once), so that a block can be run alone with -k."""
    while _state["done"] < k:
        line, code, skip = PY_BLOCKS[_state["done"]]
        _state["done"] += 1
        if skip is None:
            exec(compile(code, f"README.md:{line}", "exec"), _state["ns"])


@pytest.mark.parametrize("k", range(len(PY_BLOCKS)), ids=[f"line{b[0]}" for b in PY_BLOCKS])
def test_readme_python_block_runs_as_printed(k):
    line, code, skip = PY_BLOCKS[k]
    if skip is not None:
        pytest.skip(f"README.md:{line}: {skip}")
    torch.manual_seed(0)
    if _state["done"] > k:  # already run (as a prerequisite of a later block): rerun alone would repeat state
        return
    _run_through(k)
    _state["done"] = k + 1
    exec(compile(code, f"README.md:{line}", "exec"), _state["ns"])
    ns = _state["ns"]
    if "awp" in ns:  # no snippet leaves the weights perturbed
        assert not ns["awp"].is_perturbed


def test_readme_usage_trains():
    """The usage block's loop changed the weights and left AWP unperturbed, BatchNorm sane."""
    _run_through(len(PY_BLOCKS))
    ns = _state["ns"]
    model, awp = ns["model"], ns["awp"]
    assert awp.perturb_count >= 1 and not awp.is_perturbed
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _commands():
    """(line, module, argv) of each awpfast-train / awpfast.train / awpfast.evaluate command in sh blocks."""
    cmds = []
    for line, code, _ in _blocks("sh"):
        text = re.sub(r"\\\n", " ", code)
        for ln in text.splitlines():
            ln = ln.split(" #", 1)[0].strip()
            if not ln:
                continue
            words = shlex.split(ln)
            if len(words) > 1 and words[-1] == "..." and not words[-2].startswith("-"):
                words.pop()  # "..." standing for more options (not the value of an option)
            for i, w in enumerate(words):
                if w.endswith("awpfast-train") or (w == "awpfast.train" and words[i - 1] == "-m"):
                    cmds.append((line, "train", words[i + 1:]))
                    break
                if w == "awpfast.evaluate" and words[i - 1] == "-m":
                    cmds.append((line, "evaluate", words[i + 1:]))
                    break
    return cmds


def test_readme_command_lines_parse():
    from awpfast import evaluate as E
    from awpfast import train as T
    cmds = _commands()
    assert any(m == "train" for _, m, _ in cmds) and any(m == "evaluate" for _, m, _ in cmds)
    for line, module, argv in cmds:
        parser = (T if module == "train" else E).build_parser()
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README.md:{line}: {module} does not accept {' '.join(argv)}")
