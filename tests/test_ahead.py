"""``plan_ahead``: a batch planned on the background thread runs its ring calls without planning
on the path, with the same numbers as the float64 reference; a call whose plans were made for
other metadata (or another dtype) plans on the path and is exact all the same."""

from __future__ import annotations

import pytest
import torch

from gemma4_flexring import Layout, MaskSpec, SequenceInfo, clear_mask_cache, plan_ahead, ring_attention, ring_stats
from gemma4_flexring.ahead import wait_for_planning
from gemma4_flexring.simulated import SimulatedGroup
from gemma4_flexring.testing.reference import reference_gradients
from gemma4_flexring.testing.tolerances import RING

P, S, HQ, HKV, D = 2, 96, 4, 2, 8
MASKS = [MaskSpec(causal=True, sliding_window=12, block_bidirectional=True), MaskSpec(causal=True)]


def packed_info(cut: int) -> SequenceInfo:
    """Two documents split at ``cut``, an image block across nothing, two padding keys."""
    positions = torch.cat([torch.arange(cut), torch.arange(S - cut)]).view(1, S)
    token_types = torch.zeros(1, S, dtype=torch.long)
    token_types[0, 20:30] = 1
    attention_mask = torch.ones(1, S, dtype=torch.long)
    attention_mask[0, -2:] = 0
    return SequenceInfo.from_hf(attention_mask, positions, token_types)


def run(info: SequenceInfo, planned: SequenceInfo, layout: Layout, planned_dtype=torch.float64):
    """Every rank plans ``planned`` ahead for ``planned_dtype`` queries (and waits for it), then
    runs each mask forward and backward on ``info`` in float64: the outputs and q, k, v gradients
    (sequence order), the planning seconds spent on the path, and the inputs."""
    clear_mask_cache()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, S, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV))
    grad = torch.randn(1, HQ, S, D, generator=g, dtype=torch.float64)
    group = SimulatedGroup(P)

    def rank_fn(rank, world_size):
        plan_ahead(planned, MASKS, layout=layout, group=group, dtype=planned_dtype).result()
        results = []
        for mask in MASKS:
            local = [layout.shard(t, 2, rank).requires_grad_(True) for t in (q, k, v)]
            out = ring_attention(*local, mask=mask, info=info, layout=layout, group=group, scale=0.5)
            out.backward(layout.shard(grad, 2, rank))
            results.append((out.detach(), *(t.grad for t in local)))
        return results

    before = ring_stats().planning_s
    ranks = group.run(rank_fn)
    per_mask = [[layout.unshard([r[i][j] for r in ranks], 2) for j in range(4)] for i in range(len(MASKS))]
    return per_mask, ring_stats().planning_s - before, (q, k, v, grad)


def assert_exact(per_mask, info, tensors) -> None:
    q, k, v, grad = tensors
    for mask, (out, dq, dk, dv) in zip(MASKS, per_mask):
        tol = RING[out.dtype]
        for got, ref in zip((out, dq, dk, dv), reference_gradients(q, k, v, grad, mask, info, scale=0.5)):
            torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", [Layout("zigzag", P), Layout("contiguous", P)], ids=["zigzag", "contiguous"])
def test_a_batch_planned_ahead_plans_nothing_on_the_path(layout):
    info = packed_info(40)
    per_mask, on_path, tensors = run(info, info, layout)
    assert on_path == 0.0
    assert_exact(per_mask, info, tensors)


def test_a_balanced_layout_planned_ahead():
    info = packed_info(40)
    layout = Layout.balanced(info, P)
    per_mask, on_path, tensors = run(info, info, layout)
    assert on_path == 0.0
    assert_exact(per_mask, info, tensors)


@pytest.mark.parametrize("other", ["metadata", "dtype"])
def test_plans_made_for_something_else_are_not_used(other):
    """Planned ahead for a batch with another packing (or for float32 queries): the call plans on
    the path and stays exact."""
    info, layout = packed_info(40), Layout("zigzag", P)
    planned = packed_info(60) if other == "metadata" else info
    planned_dtype = torch.float32 if other == "dtype" else torch.float64
    per_mask, on_path, tensors = run(info, planned, layout, planned_dtype)
    assert on_path > 0.0
    assert_exact(per_mask, info, tensors)


def test_wait_for_planning_waits_for_every_batch_started():
    clear_mask_cache()
    before = ring_stats().planning_ahead_s
    for cut in (30, 50, 70):
        plan_ahead(packed_info(cut), MASKS, layout=Layout("zigzag", 1))
    wait_for_planning()
    assert ring_stats().planning_ahead_s > before


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(masks=["causal"]), TypeError, "masks must be MaskSpecs"),
    (dict(dtype="float32"), TypeError, "dtype must be a dtype"),
    (dict(layout=Layout("zigzag", 2)), ValueError, "layout is for 2 ranks, the group has 1"),
    (dict(kernel="triton"), TypeError, "kernel must be one of"),
])
def test_bad_arguments_raise_before_planning(kwargs, error, message):
    arguments = {"masks": MASKS, **kwargs}
    with pytest.raises(error, match=message):
        plan_ahead(packed_info(40), arguments.pop("masks"), **arguments)
