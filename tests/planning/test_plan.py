"""Per-pair plans: BlockMasks as flex builds them, and tiles that cover exactly the allowed pairs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch.nn.attention.flex_attention import create_block_mask

from gemma4_flexring import Layout, MaskSpec, SequenceInfo
from gemma4_flexring.testing.reference import reference_mask
from gemma4_flexring.exchange import packed_calls, ring_owner
from gemma4_flexring.planning.context import plan_context
from gemma4_flexring.planning.flags import evaluate_mask
from gemma4_flexring.planning.flex_calls import used_key_blocks
from gemma4_flexring.planning.blocks import EMPTY, Blocks
from gemma4_flexring.planning.plan import live_segment_pairs, needed_kv_rows, plan_pair
from gemma4_flexring.planning.tiles import TileKind
from gemma4_flexring.testing.cases import SPECS, make_info
from gemma4_flexring.testing.strategies import random_plans

CPU = torch.device("cpu")


def plan_of(spec, tensors, layout, seq_len, q_rank, kv_rank, block_size=None):
    """``plan_pair`` of (q_rank, kv_rank) under ``spec`` and the metadata ``tensors`` (float32 masks, CPU)."""
    return plan_pair(plan_context(spec, layout, seq_len, CPU, *tensors, block_size=block_size), q_rank, kv_rank,
                     torch.float32)


@pytest.mark.parametrize("seq_len, world_size, kind, block", [(96, 3, "zigzag", 16), (96, 2, "contiguous", 8),
                                                             (60, 2, "contiguous", 128), (120, 3, "zigzag", 7)])
def test_segment_pairs_cover_the_allowed_entries_with_flex_block_masks(seq_len, world_size, kind, block):
    """The flex calls (segment pairs) cover every allowed entry once, each a whole query segment
    against a run of key blocks that starts and ends with a block some query sees (or one such
    block and a neighbour); each BlockMask, classified block by block, equals flex's own (short
    last blocks included), and its mask_mod is the mask at the call's global positions."""
    info = make_info("all", 2, seq_len)
    spec, layout = SPECS["sliding_vision"], Layout(kind, world_size)
    dense = reference_mask(spec, info, 2, seq_len)
    for q_rank in range(world_size):
        for kv_rank in range(world_size):
            plan = plan_of(spec, info.tensors(), layout, seq_len, q_rank, kv_rank, block)
            allowed = dense[:, layout.positions(seq_len, q_rank)][:, :, layout.positions(seq_len, kv_rank)]
            covered = torch.zeros(allowed.shape[1:], dtype=torch.int32)
            segments = [slice(s.local_start, s.local_start + s.length) for s in layout.segments(seq_len, q_rank)]
            for pair in plan.pairs:
                ours, here = pair.block_mask, allowed[:, pair.q_rows, pair.kv_rows]
                q_len, kv_len = here.shape[1:]
                covered[pair.q_rows, pair.kv_rows] += 1
                seen = [bool(here[:, :, a:a + block].any()) for a in range(0, kv_len, block)]
                assert pair.q_rows in segments and (seen[0] and seen[-1] or seen in ([True, False], [False, True]))
                assert torch.equal(evaluate_mask(ours.mask_mod, 2, q_len, kv_len, CPU)[:, 0], here)
                flex = create_block_mask(ours.mask_mod, 2, None, q_len, kv_len, device="cpu", BLOCK_SIZE=block)
                assert torch.equal(ours.to_dense(), flex.to_dense())
                assert torch.equal(ours.kv_num_blocks, flex.kv_num_blocks)
                assert torch.equal(ours.full_kv_num_blocks, flex.full_kv_num_blocks)
                assert torch.equal(ours.q_num_blocks, flex.q_num_blocks)
                assert torch.equal(ours.full_q_num_blocks, flex.full_q_num_blocks)
                assert ours.seq_lengths == flex.seq_lengths
            assert covered.max() <= 1 and not (allowed.any(0) & (covered == 0)).any()


@pytest.mark.parametrize("used, runs", [
    ("..#...", ((2, 4),)),          # a lone block takes the next one
    (".....#", ((4, 6),)),          # ... or, at the segment's end, the one before
    ("#.#.", ((0, 4),)),            # widened runs that meet are one
    ("##..###", ((0, 2), (4, 7))),  # runs of two or more stay as they are
    ("#", ((0, 1),)),               # a segment of one block
    ("....", ()),
])
def test_used_key_blocks_widen_lone_blocks(used, runs):
    """A flex call over one key block would compile a graph of its own (dynamo specializes size 1)."""
    flags = torch.tensor([c == "#" for c in used]).view(1, 1, -1).expand(2, 3, -1)
    assert used_key_blocks(flags) == runs


def covered(plan, batch: int, local_len: int) -> torch.Tensor:
    """The (query row, key row) pairs the plan's tiles let through, bool [B, L, L]; no pair may be
    let through twice (its share would count twice in the merge)."""
    count = torch.zeros(batch, local_len, local_len, dtype=torch.int32)
    for tile in plan.tiles:
        region = count[:, tile.q_rows, tile.kv_rows]
        n_q, n_kv = region.shape[-2:]
        if tile.kind is TileKind.FULL:
            region += 1
        elif tile.kind is TileKind.CAUSAL:
            assert n_q == n_kv and tile.q_rows == tile.kv_rows, tile
            region += torch.ones(n_q, n_kv, dtype=torch.int32).tril()
        else:
            allowed = tile.bias[:, 0] == 0
            region += allowed.int()
            dead = ~allowed.any(-1)  # rows with no allowed key: exactly the tile's dead rows
            assert torch.equal(dead, torch.zeros_like(dead) if tile.dead_rows is None else tile.dead_rows[:, 0])
    assert count.max() <= 1, "a pair is covered twice"
    return count.bool()


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
            plan = plan_of(spec, tensors, layout, seq_len, q_rank, kv_rank, block_size)
            qp, kp = layout.positions(seq_len, q_rank), layout.positions(seq_len, kv_rank)
            want = dense[:, qp][:, :, kp]
            got = covered(plan, mask_batch, seq_len // world_size).expand_as(want)
            assert torch.equal(got, want), (q_rank, kv_rank)


@settings(max_examples=150, deadline=None)
@given(random_plans())
def test_random_plans_cover_exactly_the_allowed_pairs(problem):
    spec, info, batch, seq_len, layout, block_size = problem
    dense = reference_mask(spec, info, batch, seq_len)
    for q_rank in range(layout.world_size):
        for kv_rank in range(layout.world_size):
            plan = plan_of(spec, info.tensors(), layout, seq_len, q_rank, kv_rank, block_size)
            qp, kp = layout.positions(seq_len, q_rank), layout.positions(seq_len, kv_rank)
            want = dense[:, qp][:, :, kp]
            assert torch.equal(covered(plan, batch, seq_len // layout.world_size), want), (q_rank, kv_rank)


@settings(max_examples=100, deadline=None)
@given(random_plans())
def test_live_segment_pairs_are_the_pairs_with_an_allowed_entry_or_a_partial_class(problem):
    """A rank pair's segments classified at once (``Spans`` of runs out of order, not adjacent)
    class each segment pair as the pair's two segments as single blocks do; the pairs kept hold
    every allowed entry."""
    spec, info, batch, seq_len, layout, block_size = problem
    ctx = plan_context(spec, layout, seq_len, CPU, *info.tensors(), block_size=block_size)
    dense = reference_mask(spec, info, batch, seq_len)
    for q_rank in range(layout.world_size):
        for kv_rank in range(layout.world_size):
            live = live_segment_pairs(ctx, q_rank, kv_rank)
            for qs in layout.segments(seq_len, q_rank):
                for ks in layout.segments(seq_len, kv_rank):
                    allowed = dense[:, qs.global_start:qs.global_start + qs.length,
                                    ks.global_start:ks.global_start + ks.length].any()
                    if ctx.mask is None:
                        assert (qs, ks) in live
                        continue
                    one = (Blocks(s.global_start, s.length, s.length, CPU) for s in (qs, ks))
                    assert ((qs, ks) in live) == bool((ctx.mask.classify(*one) != EMPTY).any())
                    assert (qs, ks) in live or not allowed


def row_runs(seen: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """[start, stop) runs of the set entries of a 1-D bool tensor."""
    edges = torch.nn.functional.pad(seen.int(), (1, 1)).diff().nonzero().flatten().tolist()
    return tuple(zip(edges[::2], edges[1::2]))


@settings(max_examples=150, deadline=None)
@given(random_plans())
def test_exchanged_rows_are_exactly_the_keys_some_query_sees(problem):
    """Both sides' rows (the plan's, the key rank's ``needed_kv_rows``) are the key rows that some
    query of the query rank may see in some batch row, row by row, and every tile of another rank's
    chunk reads only them."""
    spec, info, batch, seq_len, layout, block_size = problem
    dense = reference_mask(spec, info, batch, seq_len)
    for q_rank in range(layout.world_size):
        for kv_rank in range(layout.world_size):
            ctx = plan_context(spec, layout, seq_len, CPU, *info.tensors(), block_size=block_size)
            plan = plan_pair(ctx, q_rank, kv_rank, torch.float32)
            qp, kp = layout.positions(seq_len, q_rank), layout.positions(seq_len, kv_rank)
            want = row_runs(dense[:, qp][:, :, kp].any(0).any(0))
            assert plan.kv_rows == want, (q_rank, kv_rank)
            assert needed_kv_rows(ctx, q_rank, kv_rank) == want
            if q_rank != kv_rank:  # the local chunk is read in place
                packed_calls(plan.tiles, plan.kv_rows)  # raises if a tile reads another row


def packed(kind: str, batch: int = 2, seq_len: int = 96) -> SequenceInfo:
    """Packed documents of uneven lengths (ends at 20, 44, 70 in every row) and, by ``kind``:
    "same" nothing more, "rows" the second row packed differently (ends at 30, 56), "padded"
    padding inside a document and a padded tail, "images" an image inside a document and one
    across a document end."""
    ends = [[20, 44, 70]] * batch
    if kind == "rows":
        ends = [[20, 44, 70], [30, 56]][:batch]
    docs = torch.stack([torch.bucketize(torch.arange(seq_len), torch.tensor(e), right=True) for e in ends])
    padding = blocks = None
    if kind == "padded":
        padding = torch.zeros(batch, seq_len, dtype=torch.bool)
        padding[0, 30:33] = True
        padding[:, 90:] = True
    if kind == "images":
        blocks = torch.full((batch, seq_len), -1)
        blocks[:, 24:36] = 0
        blocks[:, 66:76] = 1
    return SequenceInfo(docs, blocks, padding)


DOCUMENT_SPECS = {"causal": MaskSpec(), "narrow": MaskSpec(sliding_window=7), "wide": MaskSpec(sliding_window=40),
                  "vision": MaskSpec(block_bidirectional=True), "bidirectional": MaskSpec(causal=False)}


@pytest.mark.parametrize("block_size", [4, 8])
@pytest.mark.parametrize("kind", ["same", "rows", "padded", "images"])
@pytest.mark.parametrize("spec_name", list(DOCUMENT_SPECS))
def test_document_tiles_cover_exactly_the_allowed_pairs(spec_name, kind, block_size):
    """Documents inside segments, across segments, padded, in rows packed differently, with images,
    under windows narrower and wider than them: every allowed pair once, at 1-4 ranks, both layouts."""
    spec, info, batch, seq_len = DOCUMENT_SPECS[spec_name], packed(kind), 2, 96
    dense = reference_mask(spec, info, batch, seq_len)
    for world_size in range(1, 5):
        for layout in (Layout("contiguous", world_size), Layout("zigzag", world_size)):
            for q_rank in range(world_size):
                for kv_rank in range(world_size):
                    plan = plan_of(spec, info.tensors(), layout, seq_len, q_rank, kv_rank, block_size)
                    qp, kp = layout.positions(seq_len, q_rank), layout.positions(seq_len, kv_rank)
                    got = covered(plan, batch, seq_len // world_size)
                    assert torch.equal(got, dense[:, qp][:, :, kp]), (layout, q_rank, kv_rank)


def test_documents_are_causal_squares_and_full_rectangles():
    """Causal packed documents need no additive mask: a document a segment holds whole is a causal
    square (cut into bands of rows when short), and the part of one continuing from an earlier
    segment is one full rectangle."""
    info, layout, block = packed("same", batch=1, seq_len=128), Layout("contiguous", 2), 4
    for q_rank, kv_rank in [(0, 0), (1, 0), (1, 1)]:
        plan = plan_of(MaskSpec(), info.tensors(), layout, 128, q_rank, kv_rank, block)
        assert {t.kind for t in plan.tiles} <= {TileKind.FULL, TileKind.CAUSAL}
        if (q_rank, kv_rank) == (1, 0):  # the document [44, 70) continues at 64: rows 64..70 see keys 44..64
            assert [(t.kind, t.q_rows, t.kv_rows) for t in plan.tiles] == [(TileKind.FULL, slice(0, 6), slice(44, 64))]
    # Documents [0, 600) and [600, 4096) at blocks of 128: the short one in bands of 256 rows, the
    # one of at least 16 blocks in one call.
    docs = (torch.arange(4096) >= 600).long().view(1, -1)
    plan = plan_of(MaskSpec(), (docs,), Layout("contiguous", 1), 4096, 0, 0)
    assert [(t.kind, t.q_rows, t.kv_rows) for t in plan.tiles] == [
        (TileKind.CAUSAL, slice(0, 256), slice(0, 256)),
        (TileKind.FULL, slice(256, 512), slice(0, 256)), (TileKind.CAUSAL, slice(256, 512), slice(256, 512)),
        (TileKind.FULL, slice(512, 600), slice(0, 512)), (TileKind.CAUSAL, slice(512, 600), slice(512, 600)),
        (TileKind.CAUSAL, slice(600, 4096), slice(600, 4096))]


def test_causal_contiguous_pairs_are_skipped_full_or_causal():
    layout = Layout("contiguous", 2)
    plans = {(q, kv): plan_of(MaskSpec(), (), layout, 256, q, kv)
             for q in range(2) for kv in range(2)}
    assert plans[0, 1].tiles == ()  # the future: no kernel call
    assert [t.kind for t in plans[1, 0].tiles] == [TileKind.FULL]
    assert [t.kind for t in plans[0, 0].tiles] == [TileKind.CAUSAL]
    assert [t.kind for t in plans[1, 1].tiles] == [TileKind.CAUSAL]


def test_sliding_window_crops_to_the_band():
    layout = Layout("contiguous", 2)
    (tile,) = plan_of(MaskSpec(sliding_window=16), (), layout, 256, 1, 0, 16).tiles
    assert tile.kind is TileKind.MASKED
    # Query 128 sees keys 113 .. 128: key 112 is seen by no query of rank 1, so no tile reads it.
    assert tile.q_rows == slice(0, 16) and tile.kv_rows == slice(113, 128)
    assert tile.bias.shape == (1, 1, 16, 15)


def test_unmasked_spec_plans_one_full_tile_per_segment_pair():
    layout = Layout("zigzag", 2)
    plan = plan_of(MaskSpec(causal=False), (), layout, 16, 0, 1)
    assert [t.kind for t in plan.tiles] == [TileKind.FULL] * 4
    assert [(p.q_rows, p.kv_rows, p.block_mask) for p in plan.pairs] == [(t.q_rows, t.kv_rows, None) for t in plan.tiles]


def test_ring_owner_visits_every_rank_once():
    for world_size in range(1, 6):
        for rank in range(world_size):
            assert sorted(ring_owner(rank, s, world_size) for s in range(world_size)) == list(range(world_size))
            assert ring_owner(rank, 0, world_size) == rank


def test_dense_evaluation_in_chunks_gives_the_same_plan(monkeypatch):
    """Partial blocks are evaluated ``DENSE_CHUNK`` entries at a time; a chunk of a single block
    must give the same BlockMask and tiles as one chunk for all."""
    from gemma4_flexring.planning import flags

    info = make_info("all", 2, 96)
    args = (SPECS["sliding_vision"], info.tensors(), Layout("zigzag", 2), 96, 1, 0, 4)
    whole = plan_of(*args)
    monkeypatch.setattr(flags, "DENSE_CHUNK", 1)
    chunked = plan_of(*args)
    assert len(whole.pairs) == len(chunked.pairs)
    assert all(torch.equal(a.block_mask.to_dense(), b.block_mask.to_dense()) for a, b in zip(whole.pairs, chunked.pairs))
    assert [(t.q_rows, t.kv_rows, t.kind) for t in whole.tiles] == [(t.q_rows, t.kv_rows, t.kind) for t in chunked.tiles]


@pytest.mark.parametrize("spec, padded", [(MaskSpec(), True), (MaskSpec(sliding_window=200), False),
                                          (MaskSpec(causal=False), True)])
def test_masks_cover_partial_blocks_only(spec, padded):
    """Additive masks are kept for partial blocks only: at most three block columns per q-block
    row here (a window edge spanning two blocks, the diagonal, the padding edge), never [S, S]."""
    seq_len, block = 2048, 128
    padding = torch.zeros(1, seq_len, dtype=torch.bool)
    padding[0, -100:] = padded
    plan = plan_of(spec, (None, None, padding), Layout("contiguous", 1), seq_len, 0, 0, block)
    masked = sum(t.bias[0, 0].numel() for t in plan.tiles if t.kind is TileKind.MASKED)
    assert 0 < masked <= 3 * seq_len * block
    assert torch.equal(covered(plan, 1, seq_len)[0], reference_mask(spec, SequenceInfo(padding=padding), 1, seq_len)[0])


def test_trivial_metadata_plans_as_absent_metadata():
    """One document per row, no image, no padding: the plan of no metadata, for one row."""
    batch, seq_len, layout = 3, 96, Layout("zigzag", 2)
    trivial = (torch.arange(batch).view(-1, 1).expand(-1, seq_len), torch.full((batch, seq_len), -1),
               torch.zeros(batch, seq_len, dtype=torch.bool))
    for spec in SPECS.values():
        for q_rank, kv_rank in [(0, 0), (0, 1), (1, 0)]:
            args = (layout, seq_len, q_rank, kv_rank)
            got = plan_of(spec, trivial, *args, block_size=8)
            want = plan_of(spec, (), *args, block_size=8)
            assert [t[:3] for t in got.tiles] == [t[:3] for t in want.tiles]
            assert all(torch.equal(a.bias, b.bias) for a, b in zip(got.tiles, want.tiles) if a.kind is TileKind.MASKED)


def test_sliding_rows_pair_into_bands_on_the_causal_path():
    """A sliding window's rows of q-blocks all differ: they pair into bands of two blocks, each
    band's own square on the kernel's causal path, four calls a band instead of three a row."""
    block, seq_len = 8, 128
    spec = MaskSpec(sliding_window=32)
    plan = plan_of(spec, (), Layout("contiguous", 1), seq_len, 0, 0, block)
    bands = seq_len // (2 * block)
    squares = [(t.q_rows, t.kv_rows) for t in plan.tiles if t.kind is TileKind.CAUSAL]
    assert squares == [(slice(r, r + 2 * block),) * 2 for r in range(0, seq_len, 2 * block)]
    assert len(plan.tiles) <= 4 * bands
    assert torch.equal(covered(plan, 1, seq_len)[0], reference_mask(spec, None, 1, seq_len)[0])


@pytest.mark.parametrize("spec_name, info_kind", [
    ("sliding", "documents"), ("sliding_vision", "all"), ("causal", "packed_padded"), ("bidirectional_window", "all"),
])
def test_no_call_holds_a_block_pair_without_an_allowed_entry(spec_name, info_kind):
    """The README's caveat on non-finite keys: outside causal squares, every (query block, key
    block) a call holds has an allowed entry in some batch row."""
    block, seq_len, batch = 8, 96, 2
    info = make_info(info_kind, batch, seq_len)
    plan = plan_of(SPECS[spec_name], info.tensors(), Layout("contiguous", 1), seq_len, 0, 0, block)
    n = seq_len // block
    blocks = reference_mask(SPECS[spec_name], info, batch, seq_len).view(batch, n, block, n, block).any(4).any(2).any(0)
    calls = [t for t in plan.tiles if t.kind is not TileKind.CAUSAL]
    assert calls
    for tile in calls:
        qb = slice(tile.q_rows.start // block, -(-tile.q_rows.stop // block))
        kb = slice(tile.kv_rows.start // block, -(-tile.kv_rows.stop // block))
        assert blocks[qb, kb].all(), tile[:3]
