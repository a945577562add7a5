"""SAM / ASAM, Box AWP and RWP under DDP and FSDP2: 2 gloo processes on the CPU, float64.

One launch of ``tests/_rules_dist_worker.py`` on 2 ranks runs every case; each rank reports
its parameters' distance to a single process on the full global batch, whether the ranks
hold bitwise-equal parameters, and the collectives awpfast issued in each step.
"""
import pytest

from _dist_launch import launch, skip_without_gloo

skip_without_gloo()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch("_rules_dist_worker.py", tmp_path_factory.mktemp("rules_dist"))


SAM_CASES = [f"sam_{k}_{f}_{a}" for k in ("ddp", "fsdp") for f in ("closure", "first_step") for a in ("sam", "asam")]
BOX_CASES = [f"box_{k}_k{n}" for k in ("ddp", "fsdp") for n in (1, 2)]


@pytest.mark.parametrize("key", SAM_CASES)
def test_sam_distributed_equals_single_process_full_batch(ranks, key):
    for rep in (r[key] for r in ranks):
        assert rep["kind"] == ("ddp" if "_ddp_" in key else "fsdp2")
        assert rep["max_rel"] < 1e-10, rep["max_rel"]      # NaN fails this comparison too
        assert rep["ranks_equal"] is True
        if "_ddp_" in key:
            # closure form: one all-reduce of the ascent gradients; first_step on .grad: none (DDP's
            # own backward already averaged it)
            expected = 1 if "_closure_" in key else 0
            assert all(c["all_reduce"] == expected for c in rep["collectives"]), rep["collectives"]
        else:
            # FSDP2: one all-reduce of the global squared norm (a single float64)
            assert all(c["all_reduce"] == 1 and c["bytes"] == 8 for c in rep["collectives"]), rep["collectives"]


@pytest.mark.parametrize("key", BOX_CASES)
def test_box_awp_distributed_equals_single_process_full_batch(ranks, key):
    for rep in (r[key] for r in ranks):
        assert rep["max_rel"] < 1e-10, rep["max_rel"]
        assert rep["ranks_equal"] is True
        assert rep["names"] == ["conv1.weight", "conv2.weight", "fc.weight", "gate.weight"]
        later = key.endswith("k2")
        if "_ddp_" in key:   # step 1 from .grad: no collective; step 2's closure: one all-reduce
            assert all(c["all_reduce"] == (1 if later else 0) for c in rep["collectives"]), rep["collectives"]
        else:                # FSDP2: one all-reduce of the per-layer partial sums per ascent step
            assert all(c["all_reduce"] == (2 if later else 1) for c in rep["collectives"]), rep["collectives"]


@pytest.mark.parametrize("key", ["rwp_ddp", "rwp_fsdp"])
def test_rwp_distributed_equals_single_process_full_batch(ranks, key):
    for rep in (r[key] for r in ranks):
        assert rep["max_rel"] < 1e-10, rep["max_rel"]
        assert rep["ranks_equal"] is True
        if key == "rwp_ddp":   # one all-reduce of the ascent gradient per pass (3 passes)
            assert all(c["all_reduce"] == 3 for c in rep["collectives"]), rep["collectives"]
        else:                  # FSDP2: ||w||_all once, ||d||_all per pass: one float64 all-reduce each
            assert all(c["all_reduce"] == 4 and c["bytes"] == 32 for c in rep["collectives"]), rep["collectives"]
