"""Sharding layouts."""

from __future__ import annotations

import pytest
import torch

from gemma4_flexring import Layout


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_unshard_round_trip_and_positions(kind, world_size):
    layout = Layout(kind, world_size)
    seq_len = 24
    x = torch.arange(2 * seq_len).view(2, seq_len) * 10
    parts = [layout.shard(x, dim=1, rank=r) for r in range(world_size)]
    assert torch.equal(layout.unshard(parts, dim=1), x)
    positions = [layout.positions(seq_len, r) for r in range(world_size)]
    for r in range(world_size):
        assert torch.equal(parts[r], x[:, positions[r]])
    assert sorted(torch.cat(positions).tolist()) == list(range(seq_len))


def test_zigzag_pieces():
    layout = Layout("zigzag", 2)
    assert layout.positions(8, 0).tolist() == [0, 1, 6, 7]
    assert layout.positions(8, 1).tolist() == [2, 3, 4, 5]
    assert Layout("contiguous", 2).positions(8, 1).tolist() == [4, 5, 6, 7]


def test_bad_layouts_raise():
    with pytest.raises(ValueError, match="multiple of 8"):
        Layout("zigzag", 4).shard(torch.zeros(1, 12), dim=1, rank=0)
    with pytest.raises(ValueError, match="multiple of 3"):
        Layout("contiguous", 3).positions(10, 0)
    with pytest.raises(ValueError, match="kind"):
        Layout("ring", 2)
    with pytest.raises(ValueError, match="world_size"):
        Layout("zigzag", 0)
    with pytest.raises(ValueError, match="rank 2"):
        Layout("zigzag", 2).positions(8, 2)
    with pytest.raises(ValueError, match="2 parts"):
        Layout("zigzag", 2).unshard([torch.zeros(4)], dim=0)


# ----------------------------------------------------------------------------- balanced layouts

from hypothesis import given, settings, strategies as st  # noqa: E402

from gemma4_flexring import MaskSpec, SequenceInfo  # noqa: E402
from gemma4_flexring.layout import (TWO_RUN_SLACK, document_bounds, document_work, keys_seen, layer_mix,  # noqa: E402
                                    segments_from_table)


SLIDING, GLOBAL = MaskSpec(sliding_window=3), MaskSpec()
STACK = [(SLIDING, 5), (GLOBAL, 1)]  # a Gemma-4-like mix at a small window


def _packed(rows: list[list[int]]) -> SequenceInfo:
    return SequenceInfo(document_ids=torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(r)])
                                                  for r in rows]))


def _work_ratio(layout: Layout, info: SequenceInfo, work=None) -> float:
    """max / mean of the ranks' ``work`` (default: under a causal document mask, the balancing model's)."""
    work = document_work(info.document_ids) if work is None else work
    seq_len = work.shape[0]
    loads = [float(work[layout.positions(seq_len, r)].sum()) for r in range(layout.world_size)]
    return max(loads) / (sum(loads) / len(loads))


TARGET_ROWS = {  # the packed rows at S = 16384
    "one long document and a tail": [[14000, 2384]],
    "a long document and four short ones": [[12000, 1100, 1500, 900, 884]],
    "six uneven documents": [[5000, 3000, 2500, 1884, 2500, 1500]],
    "four equal documents": [[4096] * 4],
    "two rows packed differently": [[14000, 2384], [5000, 3000, 2500, 1884, 2500, 1500]],
}


@pytest.mark.parametrize("world_size", [2, 4, 8])
@pytest.mark.parametrize("name", list(TARGET_ROWS))
def test_balanced_work_and_tokens(name, world_size):
    info = _packed(TARGET_ROWS[name])
    layout = Layout.balanced(info, world_size)
    seq_len = 16384
    assert all(layout.positions(seq_len, r).numel() == seq_len // world_size for r in range(world_size))
    assert _work_ratio(layout, info) <= 1.05
    # Pieces are whole 128-token blocks except around document ends: few segments per rank.
    assert max(len(layout.segments(seq_len, r)) for r in range(world_size)) <= 20
    if name != "four equal documents":
        assert _work_ratio(layout, info) < _work_ratio(Layout("zigzag", world_size), info)


def test_balanced_is_zigzag_for_one_document_and_a_pure_function():
    info = SequenceInfo(shape=(2, 4096))
    assert Layout.balanced(info, 4).positions(4096, 1).tolist() == Layout("zigzag", 4).positions(4096, 1).tolist()
    packed = _packed([[3000, 1096]])
    assert Layout.balanced(packed, 4) == Layout.balanced(_packed([[3000, 1096]]), 4)
    assert Layout.balanced(packed, 4) != Layout("zigzag", 4)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.lists(st.lists(st.integers(1, 60), min_size=1, max_size=8),
                                                         min_size=1, max_size=3), st.integers(1, 16),
       st.sampled_from([None, STACK, [(MaskSpec(causal=False, sliding_window=2), 2), (GLOBAL, 1)]]))
def test_balanced_covers_every_position_once(world_size, per_rank, rows, grain, masks):
    """Any packing, length, world size, grain and layer mix: a permutation, S / P tokens per rank,
    and shard / unshard / positions consistent with it."""
    seq_len = world_size * per_rank
    docs = []
    for lengths in rows:
        row = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
        docs.append(torch.cat([row, torch.full((seq_len,), len(lengths))])[:seq_len])
    info = SequenceInfo(document_ids=torch.stack(docs))
    layout = Layout.balanced(info, world_size, block_size=grain, masks=masks)
    assert sorted(layout.permutation.tolist()) == list(range(seq_len))
    x = torch.arange(3 * seq_len).view(3, seq_len)
    parts = [layout.shard(x, 1, r) for r in range(world_size)]
    assert all(p.shape[1] == per_rank for p in parts)
    assert torch.equal(layout.unshard(parts, 1), x)
    for r in range(world_size):
        assert torch.equal(parts[r], x[:, layout.positions(seq_len, r)])
        segments = layout.segments(seq_len, r)
        assert all(a.global_start + a.length != b.global_start for a, b in zip(segments, segments[1:]))  # merged


# ----------------------------------------------------------------------------- the layer mix's work

def test_keys_seen_per_mask_within_documents():
    """Two documents of 6 and 4 tokens: a window caps a query's keys, a non-causal mask sees ahead."""
    first, end = document_bounds(torch.tensor([[0] * 6 + [1] * 4]))
    assert first.tolist() == [[0] * 6 + [6] * 4] and end.tolist() == [[6] * 6 + [10] * 4]
    assert keys_seen(GLOBAL, first, end).tolist() == [[1, 2, 3, 4, 5, 6, 1, 2, 3, 4]]
    assert keys_seen(SLIDING, first, end).tolist() == [[1, 2, 3, 3, 3, 3, 1, 2, 3, 3]]
    assert keys_seen(MaskSpec(causal=False), first, end).tolist() == [[6] * 6 + [4] * 4]
    assert keys_seen(MaskSpec(causal=False, sliding_window=1), first, end).tolist() == [[2, 3, 3, 3, 3, 2, 2, 3, 3, 2]]


def test_work_weighs_layer_kinds_by_their_counts():
    docs = _packed([[700, 300], [1000]]).document_ids
    alone = {spec: document_work(docs, [(spec, 1)]) for spec in (SLIDING, GLOBAL)}
    assert torch.equal(document_work(docs, STACK), 5 * alone[SLIDING] + alone[GLOBAL])
    assert torch.equal(document_work(docs), alone[GLOBAL])  # no masks: one causal layer
    assert int(alone[SLIDING].max()) == 2 * 3  # the window caps a query's keys (two rows)
    assert layer_mix([SLIDING, GLOBAL] + [SLIDING] * 4) == STACK


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name", list(TARGET_ROWS))
def test_stack_balanced_work_and_tokens(name, world_size):
    """Under a Gemma-4-like mix (W=1024) the balanced layout balances the mix's work within 3%, or
    within 10% holding at most two runs a rank, and at least as well as zigzag; S / P tokens per
    rank, few segments."""
    info, seq_len = _packed(TARGET_ROWS[name]), 16384
    mix = [(MaskSpec(sliding_window=1024), 5), (GLOBAL, 1)]
    layout = Layout.balanced(info, world_size, masks=mix)
    assert sorted(layout.permutation.tolist()) == list(range(seq_len))
    assert all(layout.positions(seq_len, r).numel() == seq_len // world_size for r in range(world_size))
    work = document_work(info.document_ids, mix)
    ratio = {key: _work_ratio(lay, info, work) for key, lay in (("balanced", layout), ("zigzag", Layout("zigzag", world_size)))}
    segments = max(len(layout.segments(seq_len, r)) for r in range(world_size))
    # TWO_RUN_SLACK is taken over the best candidate's busiest rank, itself within 1% of the mean here.
    assert ratio["balanced"] <= min(1.03 if segments > 2 else 1.01 * (1 + TWO_RUN_SLACK), ratio["zigzag"])
    assert segments <= 20


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name", list(TARGET_ROWS))
def test_stack_balanced_prefers_few_segments_near_the_best_balance(name, world_size):
    """The issue's rows at P=2 and P=4: the balanced layout holds no more segments than zigzag
    (planning, kernel calls and halos grow with them). Zigzag's two runs a rank, with widths chosen
    for the work, balance the stack's mix within 2.5% on all but one row; on that one (a long
    document at P=4) the best two-run candidate is 10% over the mean, and the candidates that do
    better hold five segments on a rank, so the two-run one is taken (``TWO_RUN_SLACK``)."""
    info, seq_len = _packed(TARGET_ROWS[name]), 16384
    mix = [(MaskSpec(sliding_window=1024), 5), (GLOBAL, 1)]
    layout = Layout.balanced(info, world_size, masks=mix)
    assert max(len(layout.segments(seq_len, r)) for r in range(world_size)) <= 2
    uneven = (name, world_size) == ("a long document and four short ones", 4)
    assert _work_ratio(layout, info, document_work(info.document_ids, mix)) <= (1.01 * (1 + TWO_RUN_SLACK) if uneven else 1.025)


def test_one_causal_layer_is_the_default_and_masks_are_checked():
    info = _packed([[3000, 1096]])
    assert Layout.balanced(info, 4, masks=[(GLOBAL, 1)]) == Layout.balanced(info, 4)
    assert Layout.balanced(info, 4, masks=[(GLOBAL, 3)]) == Layout.balanced(info, 4)  # the same work, scaled
    for bad in ([], [(GLOBAL, 0)], [GLOBAL], [(GLOBAL, True)], [("causal", 1)]):
        with pytest.raises(ValueError, match="masks"):
            Layout.balanced(info, 4, masks=bad)


def test_table_layouts():
    zigzag = Layout("zigzag", 2)
    assert zigzag.table(8).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    assert Layout("contiguous", 2).table(8).tolist() == list(range(8))
    explicit = Layout.from_positions(zigzag.table(8), 2)
    assert all(torch.equal(explicit.positions(8, r), zigzag.positions(8, r)) for r in range(2))
    assert len(explicit.segments(8, 1)) == 1  # rank 1's two zigzag pieces are adjacent: one run
    with pytest.raises(ValueError, match="for a sequence of 8 tokens"):
        explicit.positions(12, 0)
    with pytest.raises(ValueError, match="permutation"):
        segments_from_table(torch.tensor([0, 1, 1, 3]), 2)
    with pytest.raises(ValueError, match="multiple of 3"):
        segments_from_table(torch.arange(4), 3)
    with pytest.raises(ValueError, match="int64"):
        Layout("balanced", 2, torch.arange(4.0))
    with pytest.raises(ValueError, match="multiple of 3"):
        Layout.balanced(SequenceInfo(shape=(1, 10)), 3)
