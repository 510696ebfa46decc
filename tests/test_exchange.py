"""The exchange schedule: what each rank sends, to whom, and that the ring sends exactly that."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from gemma4_flexring import Layout, MaskSpec
from gemma4_flexring.exchange import build_exchange, packed_tiles, row_count, whole_chunks
from gemma4_flexring.reference import reference_mask
from gemma4_flexring.schedule import Tile, needed_kv_rows, plan_pair
from ring_cases import EXCHANGE_CASES, exchange_traffic
from strategies import random_plans

CPU = torch.device("cpu")


def all_exchanges(spec, tensors, layout, seq_len, batch, block_size):
    world = layout.world_size
    plans = [[plan_pair(spec, *tensors, layout, seq_len, q, kv, batch, torch.float32, CPU, block_size=block_size)
              for kv in range(world)] for q in range(world)]
    needed = [[needed_kv_rows(spec, *tensors, layout, seq_len, q, kv, batch, CPU, block_size=block_size)
               for q in range(world)] for kv in range(world)]
    return plans, needed, [build_exchange(r, world, plans[r], needed[r]) for r in range(world)]


@settings(max_examples=100, deadline=None)
@given(random_plans())
def test_sends_match_receives_and_cover_the_tiles(problem):
    """The owner derives the rows a reader's tiles of its chunk read (no more, no fewer), every send
    meets the receive of the same step on its reader, and packed tiles read inside the packed rows."""
    spec, info, batch, seq_len, layout, block_size = problem
    world, local = layout.world_size, seq_len // layout.world_size
    plans, needed, exchanges = all_exchanges(spec, info.tensors(), layout, seq_len, batch, block_size)
    dense = reference_mask(spec, info, batch, seq_len)
    for q in range(world):
        for kv in range(world):
            plan = plans[q][kv]
            assert needed[kv][q] == plan.kv_rows
            read = torch.zeros(local, dtype=torch.bool)
            for a, b in plan.kv_rows:
                read[a:b] = True
            for tile in plan.tiles if q != kv else ():  # the local chunk is read in place
                assert read[tile.kv_rows].all()
            seen = dense[:, layout.positions(seq_len, q)][:, :, layout.positions(seq_len, kv)].any(1).any(0)
            assert not (seen & ~read).any()  # every key some query may see is read
    for r, ex in enumerate(exchanges):
        assert len(ex.steps) == world and not ex.steps[0].send_rows and not ex.steps[0].recv_rows
        for s, step in enumerate(ex.steps[1:], start=1):
            peer = exchanges[step.send_to].steps[s]
            assert peer.recv_from == r and peer.recv_rows == step.send_rows
            n = row_count(step.recv_rows)
            assert all(0 <= t.kv_rows.start < t.kv_rows.stop <= n for t in step.tiles)


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


def test_whole_chunks_sends_everything_to_everyone():
    layout, spec = Layout("zigzag", 3), MaskSpec()
    plans = [plan_pair(spec, None, None, None, layout, 48, 1, kv, 1, torch.float32, CPU) for kv in range(3)]
    ex = whole_chunks(1, 3, plans, 16)
    assert [s.send_to for s in ex.steps] == [1, 2, 0] and [s.recv_from for s in ex.steps] == [1, 0, 2]
    assert all(s.recv_rows == ((0, 16),) == s.send_rows for s in ex.steps[1:])


def test_packed_tiles_move_into_the_packed_rows():
    tiles = [Tile(slice(0, 4), slice(10, 12), "full"), Tile(slice(0, 4), slice(30, 38), "full")]
    moved = packed_tiles(tiles, ((8, 12), (30, 40)))
    assert [t.kv_rows for t in moved] == [slice(2, 4), slice(4, 12)]
    with pytest.raises(AssertionError):
        packed_tiles([Tile(slice(0, 4), slice(11, 14), "full")], ((8, 12), (30, 40)))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_bytes_sent_are_the_needed_rows(cluster, layout):
    """Each rank sends exactly the rows others read of its chunk (forward and backward) and the
    dK/dV of the rows it read; in all, the rows some query may see plus at most a block per piece."""
    world = 4
    for case in EXCHANGE_CASES:
        per_rank = cluster(world).run(exchange_traffic, case, layout)
        for rank, (sent, implied, _) in enumerate(per_rank):
            assert sent == implied, (case, rank)
        # Over all ranks, sends are 3x the rows read (K/V forward, backward, dK/dV home).
        row_bytes = 2 * case.batch * case.kv_heads * case.head_dim * 8
        total_sent, total_lower = sum(p[0] for p in per_rank), sum(p[2] for p in per_rank)
        assert 3 * total_lower * row_bytes <= total_sent <= 3 * (total_lower + 2 * world * 8) * row_bytes, case
