"""pytest-benchmark cases of bench_weight_side.py (run: pytest benchmarks/ --benchmark-only).

Kept out of `make test` (which only collects tests/)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_weight_side as bws  # noqa: E402

import awpfast.ops as ops  # noqa: E402

BACKENDS = [b for b in ops.available_backends() if b != "reference" and ops._import(b)[0].supports_device(torch.device("cpu"))]


@pytest.fixture(scope="module", params=["preact18", "wrn34-10"])
def case(request):
    torch.set_num_threads(2)
    return bws.Case(request.param, torch.device("cpu"), torch.float32, copies=1)


def test_reference_eager(benchmark, case):
    benchmark.pedantic(lambda: bws.reference_eager(case.next()), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_awpfast_backend(benchmark, case, backend):
    benchmark.pedantic(lambda: bws.awpfast_backend(backend)(case.next()), rounds=5, warmup_rounds=1)
