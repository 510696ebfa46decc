"""The exchange schedule: what each rank sends, to whom, and that the ring sends exactly that."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma4_flexring import Layout, MaskSpec
from gemma4_flexring.exchange import build_exchange, cut_pieces, packed_calls, piece_bounds, row_count, sub_rows
from gemma4_flexring.testing.reference import reference_mask
from gemma4_flexring.kernels import KERNELS
from gemma4_flexring.planning.context import plan_context
from gemma4_flexring.planning.plan import needed_kv_rows, plan_pair
from gemma4_flexring.planning.tiles import Tile, TileKind, split_tile
from gemma4_flexring.testing.cases import EXCHANGE_CASES, FLEX_EXCHANGE_CASES
from gemma4_flexring.testing.strategies import random_plans
from gemma4_flexring.testing.workers import exchange_traffic
from gemma4_flexring.ring import MAX_HEAD_MESSAGES, incoming, outgoing

CPU = torch.device("cpu")


def all_exchanges(spec, tensors, layout, seq_len, batch, block_size, kernel="aten"):
    """Every rank's plans (as ``kernel`` runs them), needed rows and exchange, one piece per step."""
    world, whole_blocks = layout.world_size, KERNELS[kernel].reads_whole_blocks
    ctx = plan_context(spec, layout, seq_len, CPU, *tensors, block_size=block_size)
    plans = [[KERNELS[kernel].view(plan_pair(ctx, q, kv, torch.float32)) for kv in range(world)]
             for q in range(world)]
    needed = [[needed_kv_rows(ctx, q, kv, whole_blocks) for q in range(world)] for kv in range(world)]
    return plans, needed, [build_exchange(r, world, plans[r], needed[r], seq_len // world) for r in range(world)]


@pytest.mark.parametrize("kernel", ["aten", "flex"])
@settings(max_examples=60, deadline=None)
@given(random_plans())
def test_sends_match_receives_and_cover_the_calls(kernel, problem):
    """The owner derives the rows a reader's calls of its chunk read (no more, no fewer: exact rows
    for aten's tiles, whole key blocks for flex's segment pairs), every send meets the receive of
    the same step on its reader, and packed calls read inside the packed rows."""
    spec, info, batch, seq_len, layout, block_size = problem
    world, local = layout.world_size, seq_len // layout.world_size
    plans, needed, exchanges = all_exchanges(spec, info.tensors(), layout, seq_len, batch, block_size, kernel)
    dense = reference_mask(spec, info, batch, seq_len)
    for q in range(world):
        for kv in range(world):
            plan = plans[q][kv]
            assert needed[kv][q] == plan.kv_rows
            read = torch.zeros(local, dtype=torch.bool)
            for a, b in plan.kv_rows:
                read[a:b] = True
            for call in plan.calls if q != kv else ():  # the local chunk is read in place
                assert read[call.kv_rows].all()
            seen = dense[:, layout.positions(seq_len, q)][:, :, layout.positions(seq_len, kv)].any(1).any(0)
            assert not (seen & ~read).any()  # every key some query may see is read
    for r, ex in enumerate(exchanges):
        assert len(ex.steps) == world and not ex.steps[0].send_rows and not ex.steps[0].recv_rows
        for s, step in enumerate(ex.steps[1:], start=1):
            peer = exchanges[step.send_to].steps[s]
            assert peer.recv_from == r and peer.recv_rows == step.send_rows
            n = row_count(step.recv_rows)
            assert all(0 <= t.kv_rows.start < t.kv_rows.stop <= n for t in step.calls)


@settings(max_examples=40, deadline=None)
@given(random_plans())
def test_alone_calls_are_the_only_contributors_to_their_rows(problem):
    """A local call is alone (kept whole, in step 0's first piece) exactly when no other call of
    any step reads one of its query rows, no other local call one of its key rows, and no other
    rank reads one of those keys (their dK/dV would come home); counted row by row."""
    spec, info, batch, seq_len, layout, block_size = problem
    world, local = layout.world_size, seq_len // layout.world_size
    plans, needed, exchanges = all_exchanges(spec, info.tensors(), layout, seq_len, batch, block_size)
    for r, ex in enumerate(exchanges):
        q_uses, k_uses = torch.zeros(local, dtype=torch.int64), torch.zeros(local, dtype=torch.int64)
        for call in (c for plan in plans[r] for c in plan.calls):
            q_uses[call.q_rows] += 1
        for call in plans[r][r].calls:
            k_uses[call.kv_rows] += 1
        for a, b in (run for q in range(world) if q != r for run in needed[r][q]):
            k_uses[a:b] += 1
        expected = tuple(c for c in plans[r][r].calls
                         if (q_uses[c.q_rows] == 1).all() and (k_uses[c.kv_rows] == 1).all())
        first = ex.steps[0].pieces[:1]
        assert (first[0].calls if first and first[0].alone else ()) == expected
        assert not any(p.alone for s in ex.steps for p in s.pieces[1:] + (s.pieces[:1] if s.send_to != r else ()))
        assert ex.lone == (len(expected) == len(plans[r][r].calls)
                           and not any(s.send_rows or s.recv_rows for s in ex.steps[1:]))


def test_one_rank_runs_a_causal_layer_as_one_call():
    """At P=1 a causal layer is one alone call over the whole chunk, uncut whatever the pieces'
    size, nothing sums two shares (``Exchange.lone``) and the call is all the work
    (``Exchange.whole_call``); at P=2 every local call shares its rows with the other rank's keys
    or queries."""
    ctx = plan_context(MaskSpec(), Layout("contiguous", 1), 4096, CPU)
    plan = KERNELS["aten"].view(plan_pair(ctx, 0, 0, torch.float32))
    ex = build_exchange(0, 1, [plan], [()], 4096, 512)
    assert [(p.start, p.stop, p.alone) for p in ex.steps[0].pieces] == [(0, 4096, True)]
    assert ex.steps[0].calls == (Tile(slice(0, 4096), slice(0, 4096), TileKind.CAUSAL),) and ex.lone
    assert ex.whole_call(4096) == ex.steps[0].calls[0]
    _, _, exchanges = all_exchanges(MaskSpec(), (None, None, None), Layout("contiguous", 2), 4096, 1, 128)
    assert not any(p.alone for ex in exchanges for s in ex.steps for p in s.pieces)
    assert not any(ex.lone or ex.whole_call(2048) for ex in exchanges)


def test_sliding_halo_is_independent_of_length():
    """A sliding layer reads about W rows of its neighbouring pieces only, whatever S and P."""
    spec, block = MaskSpec(causal=True, sliding_window=512), 128
    for kind in ("contiguous", "zigzag"):
        for world, seq_len in ((4, 8192), (4, 32768), (8, 32768)):
            layout = Layout(kind, world)
            _, _, exchanges = all_exchanges(spec, (None, None, None), layout, seq_len, 1, block)
            received = 0
            for ex in exchanges:
                halos = [row_count(s.recv_rows) for s in ex.steps[1:] if s.recv_rows]
                # Keys j > i - 512 of the piece right before each own piece: its last 511 rows.
                assert all(h == 511 for h in halos) and len(halos) <= 2, (kind, world, seq_len, halos)
                received += len(halos)
            assert received == world - 1 if kind == "contiguous" else received >= world


def test_packed_calls_move_into_the_packed_rows():
    tiles = [Tile(slice(0, 4), slice(10, 12), TileKind.FULL), Tile(slice(0, 4), slice(30, 38), TileKind.FULL)]
    moved = packed_calls(tiles, ((8, 12), (30, 40)))
    assert [t.kv_rows for t in moved] == [slice(2, 4), slice(4, 12)]
    with pytest.raises(AssertionError):
        packed_calls([Tile(slice(0, 4), slice(11, 14), TileKind.FULL)], ((8, 12), (30, 40)))


@pytest.mark.parametrize("cases", ["masks", "flexmasks"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_bytes_sent_are_the_needed_rows(cluster, layout, cases):
    """Each rank sends exactly the rows others read of its chunk (forward and backward) and the
    dK/dV of the rows it read; in all, the rows some query may see plus at most a block per piece:
    for MaskSpecs and FlexMasks alike."""
    world = 4
    for case in {"masks": EXCHANGE_CASES, "flexmasks": FLEX_EXCHANGE_CASES}[cases]:
        per_rank = cluster(world).run(exchange_traffic, case, layout)
        for rank, (sent, implied, _) in enumerate(per_rank):
            assert sent == implied, (case, rank)
        # Over all ranks, sends are 3x the rows read (K/V forward, backward, dK/dV home).
        row_bytes = 2 * case.batch * case.kv_heads * case.head_dim * 8
        total_sent, total_lower = sum(p[0] for p in per_rank), sum(p[2] for p in per_rank)
        assert 3 * total_lower * row_bytes <= total_sent <= 3 * (total_lower + 2 * world * 8) * row_bytes, case


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_flex_sends_the_key_blocks_its_calls_read(cluster, layout):
    """With the flex kernel each rank sends the whole key blocks that others' calls read of its chunk
    (and their dK/dV come home): the rows some query may see, rounded out to blocks, far from the
    whole chunks every rank would otherwise send every other."""
    world = 4
    for case in EXCHANGE_CASES:
        case = replace(case, kernel="flex")
        per_rank = cluster(world).run(exchange_traffic, case, layout)
        for rank, (sent, implied, _) in enumerate(per_rank):
            assert sent == implied, (case, rank)
        row_bytes = 2 * case.batch * case.kv_heads * case.head_dim * 8
        total_sent, total_lower = sum(p[0] for p in per_rank), sum(p[2] for p in per_rank)
        whole_chunks = 3 * world * (world - 1) * (case.seq_len // world) * row_bytes
        assert 3 * total_lower * row_bytes <= total_sent < whole_chunks / 2, case


def _entries(tiles, shape) -> torch.Tensor:
    """How many of ``tiles`` compute each (batch row, query row, key row) of ``shape``, counting
    only allowed entries; also checks each tile's dead rows."""
    count = torch.zeros(shape, dtype=torch.int64)
    for t in tiles:
        n, m = t.q_rows.stop - t.q_rows.start, t.kv_rows.stop - t.kv_rows.start
        if t.kind is TileKind.MASKED:
            allowed = (t.bias[:, 0] == 0).expand(shape[0], n, m)
            dead = ~allowed.any(-1)
            assert torch.equal(t.dead_rows[:, 0].expand_as(dead), dead) if t.dead_rows is not None else not dead.any()
        else:
            assert t.bias is None and (t.kind is TileKind.FULL or n == m)
            allowed = torch.ones(shape[0], n, m, dtype=torch.bool)
            allowed = allowed.tril() if t.kind is TileKind.CAUSAL else allowed
        count[:, t.q_rows, t.kv_rows] += allowed
    return count


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(TileKind)), st.integers(1, 24), st.integers(1, 24), st.integers(0, 5),
       st.lists(st.integers(0, 40), max_size=4), st.lists(st.integers(0, 40), max_size=4), st.integers(0, 2**16))
def test_split_tile_computes_each_allowed_entry_once(kind, n, m, at, q_cuts, kv_cuts, seed):
    """Cut anywhere, a tile's sub-tiles compute exactly its allowed entries, each once; causal
    pieces are squares on the diagonal, masked ones hold their own dead rows."""
    m = n if kind is TileKind.CAUSAL else m
    bias = dead = None
    if kind is TileKind.MASKED:
        allowed = torch.rand(2, 1, n, m, generator=torch.Generator().manual_seed(seed)) < 0.5
        bias = torch.zeros(2, 1, n, m).masked_fill_(~allowed, float("-inf"))
        dead = ~allowed.any(-1)
        dead = dead if dead.any() else None
    tile = Tile(slice(at, at + n), slice(2 * at, 2 * at + m), kind, bias, dead)
    shape = (2, at + n, 2 * at + m)
    assert torch.equal(_entries(split_tile(tile, q_cuts, kv_cuts), shape), _entries([tile], shape))


def test_pieces_cut_rows_and_tiles_alike_on_both_sides():
    """Reader and owner cut the same rows into the same pieces; every call lies in one piece and
    reads at most a piece of queries."""
    assert piece_bounds(0, 4) == () and piece_bounds(10, None) == ((0, 10),)
    assert piece_bounds(10, 4) == ((0, 3), (3, 6), (6, 10))
    rows = ((2, 5), (9, 12), (20, 24))
    assert [sub_rows(rows, a, b) for a, b in piece_bounds(10, 4)] == [((2, 5),), ((9, 12),), ((20, 24),)]
    assert sub_rows(rows, 1, 8) == ((3, 5), (9, 12), (20, 22))
    tiles = [Tile(slice(0, 10), slice(0, 10), TileKind.CAUSAL), Tile(slice(10, 20), slice(0, 10), TileKind.FULL)]
    pieces = cut_pieces(tiles, 10, 4)
    assert [(p.start, p.stop) for p in pieces] == list(piece_bounds(10, 4))
    for p in pieces:
        assert all(p.start <= t.kv_rows.start < t.kv_rows.stop <= p.stop for t in p.calls)
        assert all(t.q_rows.stop - t.q_rows.start <= 4 for t in p.calls)
    shape = (1, 20, 10)
    assert torch.equal(_entries([t for p in pieces for t in p.calls], shape), _entries(tiles, shape))


def test_travelling_rows_are_paced_to_a_whole_chunks_piece_count():
    """Rows that travel are cut into at least a whole chunk's piece count while pieces keep half of
    the most rows, so both sides of a P=2 causal zigzag ring (one reads twice what the other reads)
    send and receive the same number of dK/dV pieces at every step."""
    assert piece_bounds(10, 4, pace=3) == ((0, 3), (3, 6), (6, 10))  # the size already asks for 3
    assert piece_bounds(6, 4, pace=3) == ((0, 2), (2, 4), (4, 6))  # 3 pieces of at least 2 rows
    assert piece_bounds(3, 4, pace=3) == ((0, 1), (1, 3))  # as many as half of 4 allows
    assert piece_bounds(6, None, pace=3) == ((0, 6),)
    seq_len, world, most = 4096, 2, 512
    layout = Layout("zigzag", world)
    ctx = plan_context(MaskSpec(), layout, seq_len, CPU)
    plans = [[KERNELS["aten"].view(plan_pair(ctx, q, kv, torch.float32)) for kv in range(world)] for q in range(world)]
    needed = [[needed_kv_rows(ctx, q, kv) for q in range(world)] for kv in range(world)]
    exchanges = [build_exchange(r, world, plans[r], needed[r], seq_len // world, most) for r in range(world)]
    assert sorted(row_count(ex.steps[1].recv_rows) for ex in exchanges) == [1024, 2048]
    for ex in exchanges:
        step = ex.steps[1]
        assert len(step.pieces) == len(step.home) == 4
        assert max(p.stop - p.start for p in step.pieces) <= most


@pytest.mark.parametrize("heads, rows, messages, copied", [
    (3, ((0, 64),), 1, False),                  # the whole chunk: the chunk itself
    (3, ((8, 40),), 6, False),                  # one run: a view per (batch row, head)
    (3, ((0, 8), (40, 64)), 1, True),           # several runs: one packed copy
    (MAX_HEAD_MESSAGES, ((8, 40),), 1, True),   # too many (row, head) pairs for a message each
])
def test_rows_sent_travel_as_views_when_they_are_one_run(heads, rows, messages, copied):
    """A step's K/V rows: the messages the owner sends and the receiver posts match in number and
    shape, put the rows in the receive buffer in order, and copy nothing for one run of rows."""
    chunk = torch.randn(2, heads, 64, 4)
    sent = outgoing(chunk, rows)
    assert len(sent) == messages and all(m.is_contiguous() for m in sent)
    storage = chunk.untyped_storage().data_ptr()
    assert any(m.untyped_storage().data_ptr() != storage for m in sent) == copied
    buffer = torch.empty(2, heads, row_count(rows), 4)
    received = incoming(buffer, rows, 64)
    assert [m.shape for m in received] == [m.shape for m in sent]
    for into, message in zip(received, sent):
        into.copy_(message)
    assert torch.equal(buffer, torch.cat([chunk[:, :, a:b] for a, b in rows], 2))

