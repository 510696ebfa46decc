"""Mask semantics: our mask_mods against transformers' Gemma 4 mask functions and the reference."""

from __future__ import annotations

import pytest
import torch
from transformers import masking_utils as tm

from gemma4_flexring import Layout, MaskSpec
from gemma4_flexring.planning.context import plan_context
from gemma4_flexring.planning.masks import gemma4_mask
from gemma4_flexring.testing.reference import reference_mask
from gemma4_flexring.planning.flags import evaluate_mask
from gemma4_flexring.testing.cases import INFOS, SPECS, make_info

B, S = 2, 48


def ours(spec: MaskSpec, kind: str) -> torch.Tensor:
    info = make_info(kind, B, S)
    tensors = (None, None, None) if info is None else info.tensors()
    mask = gemma4_mask(spec, *tensors)
    if mask is None:
        return torch.ones(B, S, S, dtype=torch.bool)
    return evaluate_mask(mask.mask_mod, B, S, S, torch.device("cpu"))[:, 0]


def transformers_mask(spec: MaskSpec, kind: str) -> torch.Tensor:
    """The same mask composed from transformers' own Gemma 4 building blocks."""
    info = make_info(kind, B, S)
    docs, blocks, padding = (None, None, None) if info is None else info.tensors()
    order = tm.causal_mask_function if spec.causal else tm.bidirectional_mask_function
    if spec.block_bidirectional and blocks is not None and spec.causal:
        order = tm.or_masks(order, tm.blockwise_overlay(blocks))
    parts = [order]
    if spec.sliding_window is not None:
        parts.append(tm.sliding_window_overlay(spec.sliding_window) if spec.causal
                     else tm.sliding_window_bidirectional_overlay(spec.sliding_window))
    if docs is not None:
        parts.append(tm.packed_sequence_mask_function(docs))
    if padding is not None:
        parts.append(tm.padding_mask_function(~padding))
    fn = tm.and_masks(*parts)
    b = torch.arange(B).view(-1, 1, 1)
    i = torch.arange(S).view(1, -1, 1)
    j = torch.arange(S).view(1, 1, -1)
    return torch.broadcast_to(fn(b, 0, i, j), (B, S, S))


@pytest.mark.parametrize("kind", INFOS)
@pytest.mark.parametrize("spec_name", SPECS)
def test_mask_mod_matches_transformers_and_reference(spec_name, kind):
    spec = SPECS[spec_name]
    mine = ours(spec, kind)
    assert torch.equal(mine, transformers_mask(spec, kind))
    assert torch.equal(mine, reference_mask(spec, make_info(kind, B, S), B, S))
    assert mine.any()


def test_window_edges():
    causal = ours(MaskSpec(sliding_window=3), "none")[0]
    assert causal[10, 8] and not causal[10, 7] and not causal[10, 11]
    symmetric = ours(MaskSpec(causal=False, sliding_window=3), "none")[0]
    assert symmetric[10, 7] and symmetric[10, 13] and not symmetric[10, 14] and not symmetric[10, 6]


@pytest.mark.parametrize("causal", [True, False])
def test_a_window_past_the_sequence_plans_as_no_window(causal):
    """A compiled flex kernel gives the mask_mod int32 indices, where ``i - 2**40`` wraps around
    silently; the planned mask of a window at least as long as the sequence has no window term."""
    seq_len = 64
    grid = torch.arange(seq_len, dtype=torch.int32)
    for window in (seq_len, 2**31 + 5, 2**40):
        ctx = plan_context(MaskSpec(causal=causal, sliding_window=window), Layout("zigzag", 2), seq_len,
                           torch.device("cpu"))
        if not causal:
            assert ctx.mask is None  # every pair allowed: nothing to evaluate
            continue
        zero = torch.zeros((), dtype=torch.int32)
        mine = torch.broadcast_to(ctx.mask.mask_mod(zero, zero, grid[:, None], grid[None, :]), (seq_len, seq_len))
        assert torch.equal(mine, torch.ones(seq_len, seq_len).tril().bool())


def test_vision_block_on_a_sliding_layer():
    """AND(window, OR(causal, block)): the causal window bounds how far back, not forward."""
    mask = ours(SPECS["sliding_vision"], "vision")[0]  # image 0 spans [9, 28), W = 7
    assert mask[10, 15] and mask[10, 27]   # future keys of the same image
    assert not mask[20, 10]                # same image, further back than the window
    assert not mask[10, 28]                # text after the image stays hidden
    assert not mask[5, 10]                 # text never sees the future


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_mask_spec_rejects_bad_window(bad):
    with pytest.raises((ValueError, TypeError)):
        MaskSpec(sliding_window=bad)


def test_mask_spec_is_frozen_and_hashable():
    spec = MaskSpec(sliding_window=4)
    assert spec == MaskSpec(True, 4, False) and hash(spec) == hash(MaskSpec(True, 4, False))
    with pytest.raises(AttributeError):
        spec.causal = False
    with pytest.raises(TypeError):
        MaskSpec(causal=1)
