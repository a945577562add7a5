"""AWP under DDP and FSDP2: 2 gloo processes on the CPU, float64.

One launch of ``tests/_dist_worker.py`` on 2 ranks runs every check (process start-up costs
seconds on a small machine); each test below asserts on its part of the ranks' reports.
Single-process references are AWP on the plain model with the full global batch.
"""
import pytest
import torch

from _dist_launch import launch, skip_without_gloo

skip_without_gloo()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch("_dist_worker.py", tmp_path_factory.mktemp("dist"))


def _both(ranks, key):
    return [r[key] for r in ranks]


DDP_GLOBAL = ["ddp_global_after_step_k1_m1_closure", "ddp_global_before_step_k1_m1_closure",
              "ddp_global_after_step_k2_m1_closure"]
MICRO = ["ddp_global_after_step_k1_m2_accumulate", "ddp_global_before_step_k1_m2_closure"]
FSDP = ["fsdp_after_step_k1_m1", "fsdp_before_step_k1_m1", "fsdp_after_step_k3_m1"]


@pytest.mark.parametrize("key", DDP_GLOBAL)
def test_ddp_global_equals_single_process_full_batch(ranks, key):
    for rep in _both(ranks, key):
        assert rep["kind"] == "ddp"
        assert rep["max_rel"] < 1e-10, rep["max_rel"]       # NaN fails this comparison too
        assert rep["ranks_equal"] is True
        # one bucketed all-reduce per ascent pass, of exactly the selected weights' gradients
        passes = 2 if "_k2_" in key else 1
        assert rep["perturb_collectives"]["all_reduce"] == passes
        assert rep["perturb_collectives"]["bytes"] == passes * rep["selected_bytes"]
        assert rep["perturb_collectives"]["buffer_sync"] == 0
        assert rep["names"] == ["conv1.weight", "conv2.weight", "fc.weight", "gate.weight"]  # no 'module.'


@pytest.mark.parametrize("key", MICRO)
def test_two_micro_batches_equal_one_big_batch(ranks, key):
    """accumulate() twice + perturb(), and perturb([c1, c2]): each rank's 2 micro-batches,
    averaged over 2 ranks, give single-process AWP on the whole batch of 8."""
    for rep in _both(ranks, key):
        assert rep["max_rel"] < 1e-10, rep["max_rel"]
        assert rep["ranks_equal"] is True
        assert rep["perturb_collectives"]["all_reduce"] == 1   # the micro-batches are summed first


def test_ddp_local_ranks_bitwise_equal_no_collective_bn_untouched(ranks):
    for rep in _both(ranks, "ddp_local_bn"):
        assert rep["restore"] == "before_step"
        assert all(rep["ranks_equal"])                      # after every step
        assert all(rep["bn_untouched"])                     # running stats on this rank, ascent pass
        assert not any(rep["direction_norms_equal"])        # each rank perturbed with its own batch
        for c in rep["collectives"]:
            assert c == {"all_reduce": 0, "bytes": 0, "buffer_sync": 0}
        assert "replicas would drift apart" in ranks[0]["ddp_local_after_step_error"]


def test_ddp_global_with_batchnorm(ranks):
    for rep in _both(ranks, "ddp_global_bn"):
        assert all(rep["ranks_equal"]) and all(rep["bn_untouched"]) and all(rep["direction_norms_equal"])
        assert all(c["buffer_sync"] == 0 and c["all_reduce"] == 1 for c in rep["collectives"])


@pytest.mark.parametrize("key", FSDP + ["fsdp_after_step_k1_m2", "fsdp_after_step_k1_m1_root"])
def test_fsdp2_global_equals_single_process_full_batch(ranks, key):
    for rep in _both(ranks, key):
        assert rep["kind"] == "fsdp2"
        assert rep["max_rel"] < 1e-10, rep["max_rel"]
        assert rep["ranks_equal"] is True


def test_fsdp2_memory_stays_sharded_and_grads_kept(ranks):
    total_local = 0
    for rep in _both(ranks, "fsdp_memory"):
        copies = 2 if rep["store_deltas"] else 1
        assert rep["buffer_numel"] == copies * rep["local_numel"]   # backups (+ deltas) of the shard only
        assert rep["local_numel"] < rep["full_numel"]
        # perturb() from an accumulated direction and restore(): no tensor larger than a local shard
        assert rep["max_alloc_numel"] <= rep["max_local_shard"] < rep["max_full_param"]
        assert rep["grads_kept"] is True                   # the user's sharded .grad objects and values
        total_local += rep["local_numel"]
    assert total_local == ranks[0]["fsdp_memory"]["full_numel"]


def test_distributed_checkpoints_resume_bitwise(ranks):
    for rep in _both(ranks, "ddp_checkpoint"):
        assert rep["resumed_equal"] is True and rep["ranks_equal"] is True and rep["perturb_count"] == 4
    for rep in _both(ranks, "fsdp_checkpoint"):
        assert rep["resumed_equal"] is True and rep["awp_gamma_kept"] == 0.01


def test_ddp_over_a_one_rank_group_is_single_process(ranks):
    for rep in _both(ranks, "ddp_one_rank"):
        assert rep["world_size"] == 1 and rep["equal_plain"] is True
        assert rep["collectives"]["all_reduce"] == 0


def test_bad_distributed_setups_get_clear_errors(ranks):
    errs = ranks[0]["errors"]
    assert "without use_orig_params=True" in errs["fsdp1_False"] and "fully_shard" in errs["fsdp1_False"]
    assert "FSDP1" in errs["fsdp1_True"] and "not supported" in errs["fsdp1_True"]
    assert "holds none of the model's parameters" in errs["fsdp_stale_optimizer"]
    assert "after fully_shard" in errs["fsdp_stale_optimizer"]
    assert "ascent_sync='local' needs replicated parameters" in errs["fsdp_local"]
    for rep in ranks:
        assert "no torch.distributed process group is initialized" in rep["no_group_error"]
        assert rep["no_group_unchanged"] is True


def test_plain_module_is_single_process():
    """Without DDP/FSDP2 the wrapper issues no collective (nothing needs a process group)."""
    from torch import nn

    from awpfast import AWP
    m = nn.Linear(3, 2)
    awp = AWP(torch.optim.SGD(m.parameters(), lr=0.1), m, ascent_sync="local")
    assert awp.distributed.kind == "plain" and not awp.distributed.multi
    with pytest.raises(ValueError, match="ascent_sync must be 'global' or 'local'"):
        AWP(torch.optim.SGD(m.parameters(), lr=0.1), m, ascent_sync="all")
