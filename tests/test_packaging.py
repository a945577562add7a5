"""Extras never replace the user's torch: what ``pip install -e '.[every extra]'`` and the documented
``pip install --no-deps torchattacks`` (``make autoattack``) would install, read from pip's own
``--dry-run --report``. Installing torchattacks *with* its dependencies is shown to pull torchvision
and another torch: the reason for ``--no-deps``."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPLACES_TORCH = ("torch", "torchvision", "torchaudio")


def _extras():
    src = open(os.path.join(ROOT, "setup.py")).read()
    start = src.index("extras_require={")
    body = src[start:src.index("},\n", start)]
    return sorted({line.split('"')[1] for line in body.splitlines() if line.strip().startswith('"')})


def _would_install(*spec, tmp_path):
    report = str(tmp_path / f"report{len(os.listdir(tmp_path))}.json")
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-build-isolation",
                        "--report", report, *spec], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        reason = (p.stderr.strip().splitlines() or ["?"])[-1]
        if any(w in p.stderr for w in ("Could not find a version", "No matching distribution", "connection",
                                       "Network is unreachable", "Temporary failure")):
            pytest.skip(f"the package index is unreachable from here: {reason}")
        raise AssertionError(f"pip --dry-run failed: {reason}")
    with open(report) as f:
        return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(f)["install"]}


def test_every_extra_leaves_torch_alone(tmp_path):
    extras = _extras()
    assert {"autoattack", "continual", "train", "dev"} <= set(extras)
    got = _would_install("-e", f".[{','.join(extras)}]", tmp_path=tmp_path)
    assert "awpfast" in got
    assert not [n for n in got if n in REPLACES_TORCH or n.startswith("nvidia-")], \
        f"an extra would replace torch {torch.__version__}: {got}"


def test_documented_torchattacks_install_leaves_torch_alone(tmp_path):
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    assert "pip install -q --no-deps torchattacks" in makefile  # make autoattack
    # --ignore-installed: what each command installs on a venv without torchattacks (this one may have it)
    assert set(_would_install("--ignore-installed", "--no-deps", "torchattacks", tmp_path=tmp_path)) == {"torchattacks"}
    # why: torchattacks' declared dependencies bring torchvision and, with it, another torch
    plain = _would_install("--ignore-installed", "torchattacks", tmp_path=tmp_path)
    assert "torchvision" in plain
