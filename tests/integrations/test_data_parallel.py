"""FSDP2 and DDP over data × context parallelism (``hf.cp_mesh``, ``hf.fully_shard_model``,
``hf.replicate_model``, ``hf.scale_loss_to_global_batch``): on 4 gloo ranks, dp = 2 CP groups of cp = 2 ranks, each group on
its own packed batch, one step of a tiny float64 ``Gemma4ForCausalLM`` gives every parameter the
gradient of one transformers process on the global batch (both groups' rows, mean loss over all
targets), and the ranks' losses add up to its loss. Both sides keep float64 throughout
(``keep_float64``: transformers computes RMSNorm and the loss in float32).
"""

from __future__ import annotations

import pytest
import torch

from gemma4_flexring.integrations import transformers as hf
from gemma4_flexring.testing.tiny_gemma4 import data_parallel_batch, fsdp_errors, fsdp_reference, mesh_ranks, run_fsdp
from gemma4_flexring.testing.tolerances import FSDP

DP, CP = 2, 2


@pytest.fixture(scope="module")
def one_process():
    return fsdp_reference(DP)


def assert_matches_one_process(ranks, want) -> None:
    assert all(set(rank.grads) == set(want.grads) for rank in ranks)
    loss_error, grad_errors = fsdp_errors(ranks, want)
    assert loss_error <= FSDP["loss"]
    worst = max(grad_errors, key=grad_errors.get)
    assert grad_errors[worst] <= FSDP["grads"], f"{worst}: {grad_errors[worst]:.1e}"


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_gradients_equal_one_process_on_the_global_batch(cluster, one_process, checkpointing):
    """With activation checkpointing the first layer's attention runs twice (forward, recompute).
    The dp groups' batches differ: a group trained on the other's batch would be caught."""
    assert not torch.equal(data_parallel_batch(0).input_ids, data_parallel_batch(1).input_ids)
    ranks = cluster(DP * CP).run(run_fsdp, DP, CP, checkpointing, False)
    assert_matches_one_process(ranks, one_process)
    assert [r.attention_runs for r in ranks] == [2 if checkpointing else 1] * (DP * CP)


def test_ddp_gradients_equal_one_process_on_the_global_batch(cluster, one_process):
    """``hf.replicate_model``: DDP over the world with summed gradients; every rank holds the
    whole gradient."""
    ranks = cluster(DP * CP).run(run_fsdp, DP, CP, False, False, "ddp")
    assert_matches_one_process(ranks, one_process)


def test_cp_groups_are_consecutive_ranks(cluster):
    ranks = cluster(4).run(mesh_ranks, 2, 2)
    assert [r["cp_group"] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["dp_group"] for r in ranks] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [(r["dp_rank"], r["cp_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["shard_mesh"] == [0, 1, 2, 3] for r in ranks)


def test_a_mesh_that_is_not_the_world_raises_on_every_rank(cluster):
    errors = cluster(4).errors(mesh_ranks, 3, 2)
    assert errors == [("ValueError", "cp_mesh: dp * cp = 3 * 2 = 6 ranks, but the world has 4")] * 4


@pytest.mark.parametrize("dp, cp", [(0, 2), (2, -1), (1.5, 2), (True, 2), (2, "2")])
def test_sizes_must_be_positive_ints(dp, cp):
    """Checked before torch.distributed is even looked at (this process has no group)."""
    with pytest.raises(ValueError, match="must be a positive int"):
        hf.cp_mesh(dp, cp)


def test_without_a_process_group_cp_mesh_says_so():
    with pytest.raises(RuntimeError, match="init_process_group"):
        hf.cp_mesh(1, 1)


def test_loss_scaling_needs_the_target_count():
    with pytest.raises(ValueError, match="pass labels to shard_inputs"):
        hf.scale_loss_to_global_batch({"input_ids": torch.ones(1, 4, dtype=torch.long)}, mesh=None)
