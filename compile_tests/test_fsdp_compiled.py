"""The FSDP2 recipe compiled: ``hf.fully_shard_model(..., compile=..., checkpointing=True)`` on one
CP group of 2 gloo ranks gives one process's gradients (float64), with one compiled frame per
distinct decoder layer and none for the recompute.
"""

from __future__ import annotations

from gemma4_flexring.testing.tiny_gemma4 import fsdp_errors, fsdp_reference, run_fsdp
from gemma4_flexring.testing.tolerances import FSDP

# The tiny model's 4 layers are 4 distinct graphs: sliding or global head sizes, and whether the
# layer stores its K/V for sharing (transformers' ``kv_sharing_modes``).
DISTINCT_LAYERS = 4


def test_compiled_and_checkpointed_gradients_equal_one_process(cluster):
    want = fsdp_reference(1)
    ranks = cluster(2).run(run_fsdp, 1, 2, True, "aot_eager")
    assert all(set(rank.grads) == set(want.grads) for rank in ranks)
    loss_error, grad_errors = fsdp_errors(ranks, want)
    assert loss_error <= FSDP["loss"] and max(grad_errors.values()) <= FSDP["grads"]
    assert [(r.attention_runs, r.frames) for r in ranks] == [(2, DISTINCT_LAYERS)] * 2
