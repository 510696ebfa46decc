"""The plan of one (query rank, key rank) pair: which calls a kernel makes on the queries of one
rank against the key/value chunk of another, and which key rows they read.

At ring step ``s`` rank ``r`` holds the key/value chunk of rank ``(r - s) mod P``. A pair
(query rank, key rank) splits into segment pairs, one per (query segment, key segment) of the
layout, each globally contiguous on both sides. Its blocks are classified once per batch from
the context's mask: the mask's classes (``blocks.py``) decide first which segment pairs are
empty, all of a rank pair's at once from the whole segments (``live_segment_pairs``: a layout
with many segments pays little for the pairs with nothing to do), then which blocks are empty,
full or partial; the mask is evaluated entry by entry
only inside partial blocks (``flags.py``). The flags give both kernels' calls: dense tiles
(``tiles.py``, the aten kernel) and flex calls (``flex_calls.py``). So planning costs O(S) for
the summaries, one small integer operation per block (Qb x KVb), and the partial blocks' area; a
segment pair with nothing to do is decided from its bounds and summaries alone.

The key rows a pair exchanges are exact, row by row: a key block full for some query block is
seen whole, one partial for some is seen where the dense evaluation of its partial blocks (done
for the flags anyway) allows. A masked tile of another rank's chunk that reaches past these rows
is cut to them (``fit_tiles``), so every tile reads only exchanged rows. The flex calls read
whole key blocks, and their rows are those blocks'.

Every rank derives every plan from the same global metadata, so all ranks agree on them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..layout import Segment
from .blocks import EMPTY, Blocks, Spans
from .context import PlanContext
from .flags import segment_evaluation, segment_flags
from .flex_calls import SegmentPair, block_pairs, used_key_blocks
from .rows import Rows, block_elements, merge_rows, seen_key_rows, segment_rows
from .tiles import Tile, TileKind, fit_tiles, plan_segments, plan_stretches, stretches


class PairPlan(NamedTuple):
    """The work of one (query rank, key rank) pair, in both forms a kernel may take.

    ``tiles``: the dense kernel calls (partial blocks as additive masks); ``kv_rows``: exactly the
    key rank's local rows that some query may see, row by row, which is what the exchange sends
    for tiles (``needed_kv_rows`` derives the same runs on the key rank without building tiles);
    every tile of another rank's chunk reads within one of these runs (the local chunk is read in
    place). ``pairs``: the flex calls (``SegmentPair``); ``pair_rows``: the rows they read, whole
    key blocks, what the exchange sends for them (``needed_kv_rows(..., whole_blocks=True)``).
    """

    tiles: tuple[Tile, ...]
    kv_rows: Rows
    pairs: tuple[SegmentPair, ...]
    pair_rows: Rows


class CallPlan(NamedTuple):
    """A pair's work as one kernel runs it (``ChunkKernel.view``): its calls, objects with
    ``q_rows`` / ``kv_rows`` slices (``Tile`` or ``SegmentPair``), and the key rows they read."""

    calls: tuple
    kv_rows: Rows


def plan_pair(ctx: PlanContext, q_rank: int, kv_rank: int, dtype: torch.dtype) -> PairPlan:
    """Plan every segment pair and tile of the pair (query rank, key rank); additive masks are
    of ``dtype`` (the queries'), [ctx.batch, 1, q_rows, kv_rows]."""
    mask, block_size, device = ctx.mask, ctx.block_size, ctx.device
    pairs, read_rows, pair_tiles = [], [], []
    for qs, ks in live_segment_pairs(ctx, q_rank, kv_rank):
        if mask is None:
            q_rows, kv_rows = segment_rows(qs, 0, qs.length), segment_rows(ks, 0, ks.length)
            pair_tiles.append([Tile(q_rows, kv_rows, TileKind.FULL)])
            pairs.append(SegmentPair(q_rows, kv_rows, None))
            read_rows.append((ks.local_start, ks.local_start + ks.length))
            continue
        q_blocks, k_blocks = (Blocks(s.global_start, s.length, block_size, device) for s in (qs, ks))
        (any_allowed, all_allowed, seen_keys), evaluated = segment_evaluation(mask, q_blocks, k_blocks, ctx.batch)
        read_rows.extend(seen_key_rows(seen_keys, ks))
        complete = q_blocks.complete()[:, None] & k_blocks.complete()[None, :]
        pairs += block_pairs(any_allowed, all_allowed & complete, mask.mask_mod, qs, ks, block_size)
        q_parts, k_parts = stretches(qs, ctx.document_cuts, block_size), stretches(ks, ctx.document_cuts, block_size)
        tiles = None
        if len(q_parts) > 1 or len(k_parts) > 1:
            tiles = plan_stretches(mask, q_parts, k_parts, ctx.batch, block_size, device)
        if tiles is None:
            tiles = plan_segments(any_allowed, all_allowed, evaluated, qs, ks, block_size, dtype)
        pair_tiles.append(tiles)
    read = merge_rows(read_rows)
    tiles = [t for ts in pair_tiles for t in (ts if q_rank == kv_rank else fit_tiles(ts, read))]  # local: in place
    return PairPlan(tuple(tiles), read, tuple(pairs), merge_rows((p.kv_rows.start, p.kv_rows.stop) for p in pairs))


def needed_kv_rows(ctx: PlanContext, q_rank: int, kv_rank: int, whole_blocks: bool = False) -> Rows:
    """``plan_pair(...).kv_rows`` from the flags alone (no tiles, no additive masks): the rows of
    ``kv_rank``'s chunk that some query of ``q_rank`` may see; with ``whole_blocks``,
    ``plan_pair(...).pair_rows``: the key blocks that hold such rows. The key rank calls it for
    every query rank to know what to send; both sides take the runs from the same flags, so they
    agree.
    """
    block_size, device = ctx.block_size, ctx.device
    kv_rows: list[tuple[int, int]] = []
    for qs, ks in live_segment_pairs(ctx, q_rank, kv_rank):
        if ctx.mask is None:
            kv_rows.append((ks.local_start, ks.local_start + ks.length))
            continue
        q_blocks, k_blocks = (Blocks(s.global_start, s.length, block_size, device) for s in (qs, ks))
        flags = segment_flags(ctx.mask, q_blocks, k_blocks, ctx.batch)
        if whole_blocks:
            kv_rows.extend((ks.local_start + k0, ks.local_start + k1) for k0, k1 in (
                block_elements(ks, kb0, kb1, block_size) for kb0, kb1 in used_key_blocks(flags.any_allowed)))
        else:
            kv_rows.extend(seen_key_rows(flags.seen_keys, ks))
    return merge_rows(kv_rows)


def live_segment_pairs(ctx: PlanContext, q_rank: int, kv_rank: int) -> list[tuple[Segment, Segment]]:
    """The (query segment, key segment) pairs of the two ranks that may hold an allowed entry, by
    query segment then key segment: every pair without a mask, else the pairs whose whole
    segments the mask does not class empty, all classified at once (a layout with many segments
    has mostly empty pairs: other documents, or keys after every query)."""
    q_segments, k_segments = (ctx.layout.segments(ctx.seq_len, r) for r in (q_rank, kv_rank))
    if ctx.mask is None:
        return [(qs, ks) for qs in q_segments for ks in k_segments]
    cls = ctx.mask.classify(Spans.of(q_segments, ctx.device), Spans.of(k_segments, ctx.device))
    live = (cls != EMPTY).any(0).expand(len(q_segments), len(k_segments)).nonzero().tolist()
    return [(q_segments[a], k_segments[b]) for a, b in live]
