"""Block classes against the mask evaluated entry by entry, on random metadata.

A block classed empty must hold no allowed entry, one classed full only allowed ones; the
planner's flags (classes, then dense evaluation of partial blocks) must be exact.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from gemma4_flexring import MaskSpec
from gemma4_flexring.planning.blocks import EMPTY, FULL, PARTIAL, Blocks, Spans
from gemma4_flexring.planning.masks import causal, gemma4_mask, sliding_window
from gemma4_flexring.planning.flags import evaluate_at, segment_flags
from gemma4_flexring.testing.strategies import runs

CPU = torch.device("cpu")


def dense_some(mask_mod, q: Blocks, k: Blocks, batch: int) -> torch.Tensor:
    """The mask on every entry of the two runs: bool [B, q.length, k.length]."""
    q_idx = torch.arange(q.start, q.start + q.length).view(1, -1, 1)
    k_idx = torch.arange(k.start, k.start + k.length).view(1, 1, -1)
    return evaluate_at(mask_mod, batch, q_idx, k_idx)[:, 0]


def dense_flags(mask_mod, q: Blocks, k: Blocks, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, from the mask evaluated on every entry: (any, all allowed), bool [B, Qb, KVb]."""
    allowed = dense_some(mask_mod, q, k, batch)
    shape = (batch, q.count * q.size, k.count * k.size)
    some = allowed.new_zeros(shape)
    every = allowed.new_ones(shape)
    some[:, :q.length, :k.length] = allowed
    every[:, :q.length, :k.length] = allowed
    blocks = (batch, q.count, q.size, k.count, k.size)
    return some.view(blocks).any(4).any(2), every.view(blocks).all(4).all(2)


@st.composite
def problems(draw):
    """A random mask on random metadata, and random query / key runs cut into blocks."""
    batch, seq_len = draw(st.integers(1, 2)), draw(st.integers(1, 64))
    spec = MaskSpec(causal=draw(st.booleans()),
                    sliding_window=draw(st.none() | st.integers(1, seq_len + 2)),
                    block_bidirectional=draw(st.booleans()))
    documents = draw(st.none() | runs(batch, seq_len, st.integers(0, 3)))
    images = draw(st.none() | runs(batch, seq_len, st.integers(-1, 3)))
    padding = draw(st.none() | runs(batch, seq_len, st.integers(0, 1)).map(lambda t: t.bool()))
    size = draw(st.integers(1, 20))
    spans = []
    for _ in range(2):
        start = draw(st.integers(0, seq_len - 1))
        spans.append(Blocks(start, draw(st.integers(1, seq_len - start)), size, CPU))
    return spec, (documents, images, padding), batch, spans


@settings(max_examples=300, deadline=None)
@given(problems())
def test_classes_are_sound_and_flags_exact(problem):
    spec, metadata, batch, (q, k) = problem
    mask = gemma4_mask(spec, *metadata)
    if mask is None:
        return
    some, every = dense_flags(mask.mask_mod, q, k, batch)
    for blocks in ((q, k), (q.as_one(), k.as_one())):
        cls = mask.classify(*blocks).expand(batch, blocks[0].count, blocks[1].count)
        one_some, one_every = dense_flags(mask.mask_mod, *blocks, batch)
        assert not one_some[cls == EMPTY].any()
        assert one_every[cls == FULL].all()
    flags = segment_flags(mask, q, k, batch)
    assert [torch.equal(a, b) for a, b in zip(flags[:2], (some, every))] == [True, True]
    seen = dense_some(mask.mask_mod, q, k, batch).any(0).any(0)
    assert torch.equal(flags.seen_keys, seen)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20), st.integers(0, 40), st.integers(1, 40), st.integers(0, 40), st.integers(1, 40),
       st.integers(1, 30), st.booleans())
def test_position_classes_are_exact(size, q_start, q_len, k_start, k_len, window, is_causal):
    """Order and window classes are exact: a block classed partial holds both kinds of entry."""
    q, k = Blocks(q_start, q_len, size, CPU), Blocks(k_start, k_len, size, CPU)
    for mask in (causal(), sliding_window(window, is_causal)):
        some, every = dense_flags(mask.mask_mod, q, k, 1)
        want = torch.where(every, FULL, torch.where(some, PARTIAL, EMPTY))
        assert torch.equal(mask.classify(q, k).long(), want)


def test_unsorted_documents_that_never_meet_are_refined_to_empty():
    """Ids {0, 2} against {1}: the ranges overlap, the class stays partial, dense evaluation empties it."""
    docs = torch.tensor([[0, 2, 0, 2, 1, 1, 1, 1]])
    mask = gemma4_mask(MaskSpec(causal=False), document_ids=docs)
    q, k = Blocks(0, 4, 4, CPU), Blocks(4, 4, 4, CPU)
    assert mask.classify(q, k).item() == PARTIAL
    some, every, seen = segment_flags(mask, q, k, 1)
    assert not some.any() and not every.any() and not seen.any()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3), st.integers(1, 600), st.data())
def test_spans_summarise_runs_in_any_order(batch, seq_len, data):
    """``Spans.summary`` of runs of any lengths (past a piece of 128), in any order, overlapping or
    not: each run's min and max, as slicing it gives."""
    x = data.draw(runs(batch, seq_len, st.integers(-3, 40)))
    starts = data.draw(st.lists(st.integers(0, seq_len - 1), min_size=1, max_size=6))
    bounds = [(a, data.draw(st.integers(a, seq_len - 1))) for a in starts]
    lo, hi = Spans(torch.tensor([a for a, _ in bounds]), torch.tensor([b for _, b in bounds])).summary(x)
    assert torch.equal(lo, torch.stack([x[:, a:b + 1].amin(-1) for a, b in bounds], 1))
    assert torch.equal(hi, torch.stack([x[:, a:b + 1].amax(-1) for a, b in bounds], 1))
