"""Per-pair plans: BlockMasks as flex builds them, and tiles that cover exactly the allowed pairs."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from gemma4_flexring import Layout, MaskSpec, SequenceInfo
from gemma4_flexring.masks import gemma4_mask_mod
from gemma4_flexring.reference import reference_mask
from gemma4_flexring.schedule import block_flags, block_mask_from_flags, evaluate_mask, plan_pair, ring_owner
from ring_cases import SPECS, make_info

CPU = torch.device("cpu")


@pytest.mark.parametrize("q_len, kv_len, block", [(40, 56, 16), (64, 64, 8), (30, 30, 128)])
def test_block_mask_equals_create_block_mask(q_len, kv_len, block):
    info = make_info("all", 2, 64)
    mask_mod = gemma4_mask_mod(SPECS["sliding_vision"], *info.tensors())
    ours = block_mask_from_flags(*block_flags(evaluate_mask(mask_mod, 2, q_len, kv_len, CPU), block), block,
                                 mask_mod, (q_len, kv_len))
    flex = create_block_mask(mask_mod, 2, None, q_len, kv_len, device="cpu", BLOCK_SIZE=block)
    assert torch.equal(ours.to_dense(), flex.to_dense())
    assert torch.equal(ours.kv_num_blocks, flex.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, flex.full_kv_num_blocks)
    assert torch.equal(ours.q_num_blocks, flex.q_num_blocks)
    assert ours.seq_lengths == flex.seq_lengths


def covered(plan, batch: int, local_len: int) -> torch.Tensor:
    """The (query row, key row) pairs the plan's tiles let through, bool [B, L, L]."""
    allowed = torch.zeros(batch, local_len, local_len, dtype=torch.bool)
    for tile in plan.tiles:
        region = allowed[:, tile.q_rows, tile.kv_rows]
        n_q, n_kv = region.shape[-2:]
        if tile.kind == "full":
            region |= True
        elif tile.kind == "causal":
            region |= torch.ones(n_q, n_kv, dtype=torch.bool).tril()
        else:
            region |= (tile.bias[:, 0] == 0)
            if tile.dead_rows is not None:
                assert not (tile.bias[:, 0] == 0)[tile.dead_rows[:, 0]].any()
    return allowed


@pytest.mark.parametrize("block_size", [4, 128])
@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("spec_name, info_kind", [
    ("causal", "none"), ("sliding", "documents"), ("sliding_vision", "all"), ("bidirectional_window", "padding"),
])
def test_tiles_cover_exactly_the_allowed_pairs(spec_name, info_kind, kind, block_size):
    spec, world_size, seq_len, batch = SPECS[spec_name], 3, 96, 2
    info = make_info(info_kind, batch, seq_len)
    tensors = (None, None, None) if info is None else info.tensors()
    mask_batch = 1 if info is None else batch
    layout = Layout(kind, world_size)
    dense = reference_mask(spec, info, batch, seq_len)
    for q_rank in range(world_size):
        for kv_rank in range(world_size):
            plan = plan_pair(gemma4_mask_mod(spec, *tensors), layout, seq_len, q_rank, kv_rank, mask_batch,
                             torch.float32, CPU, block_size=block_size)
            qp, kp = layout.positions(seq_len, q_rank), layout.positions(seq_len, kv_rank)
            want = dense[:, qp][:, :, kp]
            got = covered(plan, mask_batch, seq_len // world_size).expand_as(want)
            assert torch.equal(got, want), (q_rank, kv_rank)


def test_causal_contiguous_pairs_are_skipped_full_or_causal():
    layout = Layout("contiguous", 2)
    mask_mod = gemma4_mask_mod(MaskSpec())
    plans = {(q, kv): plan_pair(mask_mod, layout, 256, q, kv, 1, torch.float32, CPU) for q in range(2) for kv in range(2)}
    assert plans[0, 1].tiles == ()  # the future: no kernel call
    assert [t.kind for t in plans[1, 0].tiles] == ["full"]
    assert [t.kind for t in plans[0, 0].tiles] == ["causal"]
    assert [t.kind for t in plans[1, 1].tiles] == ["causal"]


def test_sliding_window_crops_to_the_band():
    layout = Layout("contiguous", 2)
    mask_mod = gemma4_mask_mod(MaskSpec(sliding_window=16))
    (tile,) = plan_pair(mask_mod, layout, 256, 1, 0, 1, torch.float32, CPU, block_size=16).tiles
    assert tile.kind == "masked"
    assert tile.q_rows == slice(0, 16) and tile.kv_rows == slice(112, 128)
    assert tile.bias.shape == (1, 1, 16, 16)


def test_unmasked_spec_plans_one_full_tile_per_segment_pair():
    layout = Layout("zigzag", 2)
    plan = plan_pair(None, layout, 16, 0, 1, 1, torch.float32, CPU)
    assert [t.kind for t in plan.tiles] == ["full"] * 4 and plan.block_masks == ()


def test_ring_owner_visits_every_rank_once():
    for world_size in range(1, 6):
        for rank in range(world_size):
            assert sorted(ring_owner(rank, s, world_size) for s in range(world_size)) == list(range(world_size))
            assert ring_owner(rank, 0, world_size) == rank


def test_segment_block_mask_built_in_row_chunks_equals_create_block_mask():
    """Planning evaluates the mask ROW_CHUNK_BLOCKS q-block rows at a time (here 2 chunks, the
    last one short); the BlockMask must equal flex's own, built in one go."""
    from gemma4_flexring.layout import Segment
    from gemma4_flexring.schedule import ROW_CHUNK_BLOCKS, segment_block_mask

    block = 4
    qs, ks = Segment(0, 30, 4 * block * ROW_CHUNK_BLOCKS // 3 * 2 + 3), Segment(0, 10, 90)
    assert qs.length > block * ROW_CHUNK_BLOCKS
    info = make_info("all", 2, 256)
    mask_mod = gemma4_mask_mod(SPECS["sliding_vision"], *info.tensors())
    ours = segment_block_mask(mask_mod, qs, ks, 2, CPU, block)
    flex = create_block_mask(ours.mask_mod, 2, None, qs.length, ks.length, device="cpu", BLOCK_SIZE=block)
    assert torch.equal(ours.to_dense(), flex.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, flex.full_kv_num_blocks)


@pytest.mark.parametrize("spec, padded", [(MaskSpec(), True), (MaskSpec(sliding_window=200), False),
                                          (MaskSpec(causal=False), True)])
def test_masks_cover_partial_blocks_only(spec, padded):
    """Additive masks are kept for partial blocks only: at most three block columns per q-block
    row here (a window edge spanning two blocks, the diagonal, the padding edge), never [S, S]."""
    seq_len, block = 2048, 128
    padding = torch.zeros(1, seq_len, dtype=torch.bool)
    padding[0, -100:] = padded
    plan = plan_pair(gemma4_mask_mod(spec, padding=padding), Layout("contiguous", 1), seq_len, 0, 0, 1,
                     torch.float32, CPU, block_size=block)
    masked = sum(t.bias[0, 0].numel() for t in plan.tiles if t.kind == "masked")
    assert 0 < masked <= 3 * seq_len * block
    assert torch.equal(covered(plan, 1, seq_len)[0], reference_mask(spec, SequenceInfo(padding=padding), 1, seq_len)[0])
