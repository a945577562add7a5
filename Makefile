# The README's two commands. Both set everything up from a fresh clone.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
TORCH   ?= torch==2.13.0

.PHONY: setup demo test test-all bench autoattack clean

$(VENV)/.ok: setup.py pyproject.toml $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.inc' -o -name '*.py' \) -not -path '*__pycache__*' 2>/dev/null)
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	# A CPU torch from local disk; keep an existing torch if the venv already has one.
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q pybind11 numpy
	$(VPY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

setup: $(VENV)/.ok

demo: setup
	$(VPY) -m awpfast.demo

# pytest-xdist: one worker per core (at most 4), the longest tests first (tests/conftest.py)
XDIST   ?= -n auto --maxprocesses 4 --dist worksteal

test: setup
	$(VPY) -m pytest -q $(XDIST) -m "not slow" tests

test-all: setup
	$(VPY) -m pytest -q $(XDIST) tests

# AutoAttack through torchattacks, without the torchvision it declares (which would replace torch)
autoattack: setup
	$(VPY) -m pip install -q -e ".[autoattack]"
	$(VPY) -m pip install -q --no-deps torchattacks

bench: setup
	$(VPY) benchmarks/bench_weight_side.py

clean:
	rm -rf $(VENV) build *.egg-info awpfast/_C*.so
