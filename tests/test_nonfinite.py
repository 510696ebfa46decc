"""Non-finite keys: padding keys never reach any output or gradient, whatever they hold; other
masked keys reach only the query blocks the ring computes with theirs (the README's "Numerics")."""

from __future__ import annotations

import pytest
import torch

from gemma4_flexring import Layout
from gemma4_flexring.testing.cases import Case, make_info
from gemma4_flexring.testing.reference import reference_mask
from gemma4_flexring.testing.workers import padding_keys, run_poisoned

NAMES = ("out", "dq", "dk", "dv")

PADDING_CASES = [
    Case("causal", "padding"),
    Case("causal", "packed_padded", torch.float32),
    Case("sliding_vision", "all"),
    Case("causal_vision", "all", torch.bfloat16),
    Case("bidirectional", "padding", torch.float32),
    Case("bidirectional_window", "all", seq_len=96, block_size=8),
    Case("sliding", "packed_padded", seq_len=96, block_size=8),
]


def _run(cluster, world_size: int, *args) -> list:
    if world_size == 1:
        return [run_poisoned(0, 1, *args)]
    return cluster(world_size).run(run_poisoned, *args)


def _unshard(results, layout, world_size, index, part):
    return layout.unshard([results[r][index][part] for r in range(world_size)], dim=2)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_padding_keys_never_leak(cluster, world_size, layout):
    """NaN, +Inf and -Inf in K and V at every padding key change no bit of any output or
    gradient, and padding keys get exactly zero dK and dV."""
    clean, dirty = (_run(cluster, world_size, PADDING_CASES, layout, where) for where in ("none", "padding"))
    sharding = Layout(layout, world_size)
    for index, case in enumerate(PADDING_CASES):
        pad = padding_keys(case)
        for part, name in enumerate(NAMES):
            want, got = (_unshard(r, sharding, world_size, index, part) for r in (clean, dirty))
            assert torch.equal(got, want), f"{case} {name}: a padding key changed it"
            if name in ("dk", "dv"):
                assert (got.transpose(1, 2)[pad] == 0).all(), f"{case} {name}: padding keys got a gradient"


MASKED_KEY_CASES = [
    Case("bidirectional_window", "documents", seq_len=96, block_size=8),
    Case("sliding", "documents", seq_len=96, block_size=8),
    Case("sliding_vision", "all", seq_len=96, block_size=8),
]
POISONED_KEY = 45  # in the middle document, inside image block 0, on rank 0 (contiguous) / rank 1 (zigzag)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_masked_keys_reach_only_computed_blocks(cluster, layout):
    """A non-finite K and V at a non-padding key j never reach a query whose block holds no
    allowed (query, key) pair with j's block in any batch row: that query's output and dq keep
    every bit. (Rows in computed blocks may turn NaN though j is masked for them: asserted
    below, so that the README's caveat stays true.)"""
    world_size, block = 2, 8
    clean, dirty = (_run(cluster, world_size, MASKED_KEY_CASES, layout, where)
                    for where in ("none", f"key:{POISONED_KEY}"))
    sharding = Layout(layout, world_size)
    for index, case in enumerate(MASKED_KEY_CASES):
        assert case.block_size == block and case.seq_len % (2 * world_size * block) == 0  # blocks align with pieces
        s = case.seq_len
        allowed = reference_mask(case.mask, make_info(case.info, case.batch, s), case.batch, s)
        blocks = allowed.view(case.batch, s // block, block, s // block, block).any(4).any(2).any(0)
        reachable = blocks[:, POISONED_KEY // block].repeat_interleave(block)  # [S] queries
        sees_key = allowed[:, :, POISONED_KEY]  # [B, S]
        out = _unshard(dirty, sharding, world_size, index, 0)
        assert out.isnan().transpose(1, 2)[sees_key].all(), "the poisoned key is visible: those rows are NaN"
        for part in (0, 1):  # out, dq
            want, got = (_unshard(r, sharding, world_size, index, part) for r in (clean, dirty))
            assert torch.equal(got[:, :, ~reachable], want[:, :, ~reachable]), f"{case} {NAMES[part]}"
        masked_nan = out.isnan().any(-1).any(1) & ~sees_key  # [B, S]
        assert masked_nan.any() and reachable[masked_nan.nonzero()[:, 1]].all()
