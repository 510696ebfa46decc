"""Per-pair ring schedule: which tiles of (local queries x visiting key chunk) need a kernel.

At ring step ``s`` rank ``r`` holds the key/value chunk of rank ``(r - s) mod P``. A pair
(query rank, key rank) splits into segment pairs, one per (query segment, key segment) of the
layout, each globally contiguous on both sides. Its blocks are classified once per batch from
the Gemma 4 ``Mask``: the mask's classes (``blocks.py``) decide first whether the whole segment
pair is empty, then which blocks are empty, full or partial; the mask is evaluated entry by entry
only inside partial blocks. The flags give the flex calls (``SegmentPair``: a ``BlockMask`` per
run of key blocks some query sees) and the dense calls below. So planning costs O(S) for the
summaries, one small integer operation per block (Qb x KVb), and the partial blocks' area; a
segment pair with nothing to do is decided from its bounds and summaries alone, before any block
is classified.
The blocks decide the kernel calls (tiles):

Packed causal documents are planned one by one: the segments are cut at document starts into
stretches (``stretches``). When every pair of stretches with an allowed entry is all allowed or
exactly a causal square (a document the segment pair holds whole, with no padding or image in
it), each becomes unmasked and causal calls (no additive mask), and the part of a document that
continues from an earlier segment is one full rectangle; otherwise the segment pair is planned
on its blocks as below. Cutting changes only which calls cover the allowed pairs.

- no allowed block                 -> skipped, no kernel call;
- every entry allowed              -> one unmasked call over the allowed blocks' span;
- the causal square                -> one call on the kernel's own causal path;
- otherwise, per band of q-blocks  -> a band is a run of equal rows of blocks, or two rows that
                                      differ (``_band_calls``): one call per run of key blocks of
                                      one kind, unmasked over blocks all its rows see whole, with
                                      an additive mask over blocks every row uses in part; a block
                                      only some rows use is a call of those rows; a band's own
                                      causal square runs on the kernel's causal path. Masks thus
                                      cover partial blocks (and a band's edge blocks) only:
                                      O(L x block), not L^2, for a sliding window, causal with
                                      padding, or packed documents.

The key rows a pair exchanges are exact, row by row: a key block full for some query block is
seen whole, one partial for some is seen where the dense evaluation of its partial blocks (done
for the flags anyway) allows. A masked tile of another rank's chunk that reaches past these rows
is cut to them (``fit_tiles``), so every tile reads only exchanged rows.

Every rank derives every plan from the same global metadata, so all ranks agree on them.
"""

from __future__ import annotations

import bisect
from enum import Enum
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .blocks import EMPTY, FULL, PARTIAL, Blocks, Spans
from ..layout import Layout, Segment
from .masks import Mask, MaskMod, MaskSpec, gemma4_mask, offset_mask_mod
from .metadata import informative

BLOCK_SIZE = 128
DENSE_CHUNK = 1 << 22  # mask entries planning evaluates at once, bounding its memory
# In blocks: a causal square this long is one call; a shorter one is cut into bands of rows this high.
CAUSAL_WHOLE_BLOCKS, BAND_BLOCKS = 16, 2


def ring_owner(rank: int, step: int, world_size: int) -> int:
    """Rank whose key/value chunk ``rank`` holds at ring ``step``."""
    return (rank - step) % world_size


class TileKind(Enum):
    """How a kernel call treats its entries: all allowed, exactly ``j <= i`` on a square on the
    diagonal (the kernel's causal path), or as the tile's additive mask allows."""

    FULL = "full"
    CAUSAL = "causal"
    MASKED = "masked"


class Tile(NamedTuple):
    """One kernel call: local query rows against rows of the visiting chunk.

    ``bias`` is the additive 0/-inf mask [B or 1, 1, q_rows, kv_rows] for ``TileKind.MASKED``;
    ``dead_rows`` [B or 1, 1, q_rows] marks queries with no allowed key in this tile.
    """

    q_rows: slice
    kv_rows: slice
    kind: TileKind
    bias: Tensor | None = None
    dead_rows: Tensor | None = None


Rows = tuple[tuple[int, int], ...]  # sorted, disjoint [start, stop) runs of a rank's local rows


class SegmentPair(NamedTuple):
    """One flex call: a query segment against one run of key blocks of one key segment.

    Per (query segment, key segment), each run of key blocks that some query may see is one call
    (``block_pairs``); key blocks outside the runs are never read. ``q_rows`` is the whole query
    segment, ``kv_rows`` the run, whole blocks of its segment (local rows, rows of the visiting
    chunk). ``block_mask`` is the call's flex BlockMask over (q_rows, kv_rows), None when no mask
    applies; its mask_mod reads the rows' global offsets from 0-d tensors, so a compiled kernel
    sees the same closure structure for every call.
    """

    q_rows: slice
    kv_rows: slice
    block_mask: BlockMask | None


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


def plan_pair(spec: MaskSpec, document_ids: Tensor | None, block_ids: Tensor | None, padding: Tensor | None,
              layout: Layout, seq_len: int, q_rank: int, kv_rank: int, batch: int, dtype: torch.dtype,
              device: torch.device, block_size: int | None = None) -> PairPlan:
    """Plan every segment pair and tile of the pair (query rank, key rank).

    Args:
        spec: the layer's mask.
        document_ids, block_ids, padding: whole-sequence metadata [batch, S] (see ``SequenceInfo``),
            each None when absent. Trivial values (one document per row, no image, no padding)
            count as absent.
        batch: the metadata's rows. Plans are built for one row when no metadata matters, so
            additive masks are [batch or 1, 1, q_rows, kv_rows].
        dtype, device: of the additive masks (the queries').
    """
    block_size = BLOCK_SIZE if block_size is None else block_size
    metadata = informative(document_ids, block_ids, padding)
    batch = batch if any(t is not None for t in metadata) else 1
    mask = gemma4_mask(spec, *metadata)
    cuts = document_cuts(metadata[0])
    pairs, read_rows, pair_tiles = [], [], []
    for qs in layout.segments(seq_len, q_rank):
        for ks in layout.segments(seq_len, kv_rank):
            if mask is None:
                q_rows, kv_rows = _rows(qs, 0, qs.length), _rows(ks, 0, ks.length)
                pair_tiles.append([Tile(q_rows, kv_rows, TileKind.FULL)])
                pairs.append(SegmentPair(q_rows, kv_rows, None))
                read_rows.append((ks.local_start, ks.local_start + ks.length))
                continue
            q_blocks, k_blocks = (Blocks(s.global_start, s.length, block_size, device) for s in (qs, ks))
            any_allowed, all_allowed, seen_keys = segment_flags(mask, q_blocks, k_blocks, batch)
            read_rows.extend(seen_key_rows(seen_keys, ks))
            complete = q_blocks.complete()[:, None] & k_blocks.complete()[None, :]
            pairs += block_pairs(any_allowed, all_allowed & complete, mask.mask_mod, qs, ks, block_size)
            q_parts, k_parts = stretches(qs, cuts, block_size), stretches(ks, cuts, block_size)
            tiles = None
            if len(q_parts) > 1 or len(k_parts) > 1:
                tiles = plan_stretches(mask, q_parts, k_parts, batch, block_size, device)
            if tiles is None:
                tile_mod = offset_mask_mod(mask.mask_mod, qs.global_start, ks.global_start)
                tiles = plan_segments(any_allowed, all_allowed, tile_mod, qs, ks, block_size, dtype)
            pair_tiles.append(tiles)
    read = merge_rows(read_rows)
    tiles = [t for ts in pair_tiles for t in (ts if q_rank == kv_rank else fit_tiles(ts, read))]  # local: in place
    return PairPlan(tuple(tiles), read, tuple(pairs), merge_rows((p.kv_rows.start, p.kv_rows.stop) for p in pairs))


def block_pairs(any_allowed: Tensor, all_allowed: Tensor, mask_mod: MaskMod, qs: Segment, ks: Segment,
                block_size: int) -> list[SegmentPair]:
    """The flex calls of one segment pair (``SegmentPair``), from its block flags [B, Qb, KVb]
    (``all_allowed`` set on complete blocks only): one per run of key blocks with an allowed entry
    (``used_key_blocks``), over the whole query segment.

    Whole query segments keep the compiled flex calls' query shapes those of the layout's
    segments: cut to the query blocks a run serves, the calls took 15 + 17 forward + backward
    graphs against 12 + 14 (measured on the CPU with dynamo's compile counter, six masks at
    S=2048, P=4, contiguous operands, lone key blocks not widened). The query blocks a run does
    not serve cost the kernel nothing (no key block to visit).
    """
    calls = []
    for kb0, kb1 in used_key_blocks(any_allowed):
        k0, k1 = _elements(ks, kb0, kb1, block_size)
        # Tensor offsets: a compiled flex guards on closure ints' values, not on tensors'.
        offsets = (torch.tensor(s.global_start + at, device=any_allowed.device) for s, at in ((qs, 0), (ks, k0)))
        some, every = (flags[:, None, :, kb0:kb1] for flags in (any_allowed, all_allowed))
        block_mask = block_mask_from_flags(some, every, block_size, offset_mask_mod(mask_mod, *offsets),
                                           (qs.length, k1 - k0))
        calls.append(SegmentPair(_rows(qs, 0, qs.length), _rows(ks, k0, k1), block_mask))
    return calls


def used_key_blocks(any_allowed: Tensor) -> Rows:
    """Runs [kb0, kb1) of the key blocks with an allowed entry for some query block and batch row,
    from block flags [B, Qb, KVb]. A run of one block takes a neighbour too (the next one, or the
    one before at the segment's end) when the segment has one: a compiled flex call specializes a
    block count of 1, so such calls compiled graphs of their own."""
    used = any_allowed.any(0).any(0)
    runs = [(kb0, kb1) for _, kb0, kb1, _ in _runs(used.view(1, -1).to(torch.int8)).tolist()]
    count = used.numel()
    if count < 2:
        return tuple(runs)
    return merge_rows((a, a + 2) if b - a == 1 and b < count else (a - 1, b) if b - a == 1 else (a, b) for a, b in runs)


def needed_kv_rows(spec: MaskSpec, document_ids: Tensor | None, block_ids: Tensor | None,
                   padding: Tensor | None, layout: Layout, seq_len: int, q_rank: int, kv_rank: int, batch: int,
                   device: torch.device, block_size: int | None = None, whole_blocks: bool = False) -> Rows:
    """``plan_pair(...).kv_rows`` from the flags alone (no tiles, no additive masks): the rows of
    ``kv_rank``'s chunk that some query of ``q_rank`` may see; with ``whole_blocks``,
    ``plan_pair(...).pair_rows``: the key blocks that hold such rows. The key rank calls it for
    every query rank to know what to send; both sides take the runs from the same flags, so they
    agree.
    """
    block_size = BLOCK_SIZE if block_size is None else block_size
    metadata = informative(document_ids, block_ids, padding)
    batch = batch if any(t is not None for t in metadata) else 1
    mask = gemma4_mask(spec, *metadata)
    kv_rows: list[tuple[int, int]] = []
    for ks in layout.segments(seq_len, kv_rank):
        if mask is None:
            kv_rows.append((ks.local_start, ks.local_start + ks.length))
            continue
        k_blocks = Blocks(ks.global_start, ks.length, block_size, device)
        for qs in layout.segments(seq_len, q_rank):
            q_blocks = Blocks(qs.global_start, qs.length, block_size, device)
            flags = segment_flags(mask, q_blocks, k_blocks, batch)
            if whole_blocks:
                kv_rows.extend((ks.local_start + k0, ks.local_start + k1) for k0, k1 in (
                    _elements(ks, kb0, kb1, block_size) for kb0, kb1 in used_key_blocks(flags.any_allowed)))
            else:
                kv_rows.extend(seen_key_rows(flags.seen_keys, ks))
    return merge_rows(kv_rows)


def seen_key_rows(seen_keys: Tensor, ks: Segment) -> list[tuple[int, int]]:
    """Local rows of segment ``ks`` that some query may see, as runs; ``seen_keys`` [ks.length]
    are ``segment_flags``' seen keys."""
    if seen_keys.all():
        return [(ks.local_start, ks.local_start + ks.length)]
    return [(ks.local_start + a, ks.local_start + b) for _, a, b, _ in _runs(seen_keys.view(1, -1).to(torch.int8)).tolist()]


def fit_tiles(tiles: list[Tile], rows: Rows) -> list[Tile]:
    """``tiles`` reading only the key rows ``rows`` (sorted, disjoint runs that hold every key some
    tile's query may see). A tile within one run stays as it is; a masked tile reaching past a run
    is cut to its pieces within runs (the keys it loses are seen by no query), and a piece left
    with no allowed entry is dropped.

    Tiles keep whole blocks where they can: cropped to odd key counts, the CPU kernel's calls were
    measured up to 1.5x slower (128 x 127 against 128 x 128 keys).

    Raises:
        AssertionError: an unmasked or causal tile reads a row outside ``rows``.
    """
    starts = [a for a, _ in rows]
    fitted = []
    for tile in tiles:
        cols = tile.kv_rows
        run = bisect.bisect_right(starts, cols.start) - 1
        if run >= 0 and cols.stop <= rows[run][1]:
            fitted.append(tile)
            continue
        assert tile.kind is TileKind.MASKED, f"{tile.kind} tile reads rows {cols} outside {rows}"
        for a, b in rows:
            a, b = max(a, cols.start), min(b, cols.stop)
            allowed = tile.bias[..., a - cols.start:b - cols.start] == 0
            if a < b and allowed.any():
                fitted.append(_masked_tile(tile.q_rows, slice(a, b), allowed, tile.bias.dtype))
    return fitted


def merge_rows(rows) -> Rows:
    """Sorted, disjoint runs covering the union of [start, stop) runs ``rows``."""
    merged: list[list[int]] = []
    for start, stop in sorted(rows):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return tuple((a, b) for a, b in merged)


class Flags(NamedTuple):
    """Exact flags of one segment pair: ``any_allowed``/``all_allowed`` bool [B, Qb, KVb] per
    (query block, key block), and ``seen_keys`` bool [key segment length]: the keys that some
    query of the segment may see (in some batch row)."""

    any_allowed: Tensor
    all_allowed: Tensor
    seen_keys: Tensor


def segment_flags(mask: Mask, q: Blocks, k: Blocks, batch: int) -> Flags:
    """Exact flags of every (query block, key block) of one segment pair (see ``Flags``). "All"
    looks at the segments' entries only: a short last block whose entries are all allowed counts
    as all allowed.

    The segment pair is classified as one block first, then block by block; only blocks classed
    partial are evaluated densely (and may turn out empty or full). The seen keys come from the
    same evaluation: a key block full for some query block is seen whole, one partial for some
    is seen where its dense evaluation allows.
    """
    shape = (batch, q.count, k.count)
    if (mask.classify(q.as_one(), k.as_one()) == EMPTY).all():
        nothing = torch.zeros(shape, dtype=torch.bool, device=q.device)
        return Flags(nothing, nothing, torch.zeros(k.length, dtype=torch.bool, device=q.device))
    cls = mask.classify(q, k).expand(shape)
    any_allowed, all_allowed = cls != EMPTY, cls == FULL
    seen = all_allowed.flatten(0, 1).any(0).repeat_interleave(k.size)
    qb, kb = (cls == PARTIAL).any(0).nonzero(as_tuple=True)
    if qb.numel():
        any_allowed[:, qb, kb], all_allowed[:, qb, kb], key_rows = dense_block_flags(mask.mask_mod, q, k, qb, kb,
                                                                                      batch)
        seen.view(k.count, k.size).index_put_((kb,), key_rows, accumulate=True)
    return Flags(any_allowed, all_allowed, seen[:k.length])


def dense_block_flags(mask_mod: MaskMod, q: Blocks, k: Blocks, qb: Tensor, kb: Tensor,
                      batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """``mask_mod`` evaluated entry by entry on the blocks (qb[n], kb[n]): (any allowed, all
    allowed), bool [batch, n], over the blocks' entries only, and which keys of each block some
    query of it sees in some batch row, bool [n, k.size]. At most ``DENSE_CHUNK`` entries are
    evaluated at once."""
    (q_first, q_last), (k_first, k_last) = q.bounds(), k.bounds()
    q_idx, q_real = block_indices(q_first[qb], q_last[qb], q.size)
    k_idx, k_real = block_indices(k_first[kb], k_last[kb], k.size)
    step = max(1, DENSE_CHUNK // (batch * q.size * k.size))
    some, every, keys = [], [], []
    for n in range(0, qb.numel(), step):
        part = slice(n, n + step)
        allowed = evaluate_at(mask_mod, batch, q_idx[part, :, None], k_idx[part, None, :])
        real = q_real[part, :, None] & k_real[part, None, :]
        hit = allowed & real
        some.append(hit.flatten(2).any(-1))
        every.append((allowed | ~real).flatten(2).all(-1))
        keys.append(hit.any(0).any(1))
    return torch.cat(some, 1), torch.cat(every, 1), torch.cat(keys, 0)


def block_indices(first: Tensor, last: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Positions of blocks [first[n], last[n]] padded to ``size`` by repeating the last one, and
    which of them are real: int64 [n, size], bool [n, size]."""
    idx = first[:, None] + torch.arange(size, device=first.device)
    return torch.minimum(idx, last[:, None]), idx <= last[:, None]


def document_cuts(document_ids: Tensor | None) -> list[int]:
    """Global positions where a document starts in some batch row, position 0 excluded, sorted;
    none without documents. ``document_ids`` [B, S]."""
    if document_ids is None:
        return []
    return ((document_ids[:, 1:] != document_ids[:, :-1]).any(0).nonzero().flatten() + 1).tolist()


def stretches(segment: Segment, cuts: list[int], min_length: int) -> list[Segment]:
    """``segment`` cut at the global positions ``cuts`` (sorted) into consecutive sub-segments. A cut
    that would leave a piece shorter than ``min_length`` is skipped: a short document joins the
    piece before it (or, at the segment's start, the one after it)."""
    start, stop = segment.global_start, segment.global_start + segment.length
    kept = [start]
    for cut in cuts:
        if cut - kept[-1] >= min_length and stop - cut >= min_length:
            kept.append(cut)
    kept.append(stop)
    return [Segment(segment.local_start + a - start, a, b - a) for a, b in zip(kept, kept[1:])]


def plan_stretches(mask: Mask, q_parts: list[Segment], k_parts: list[Segment], batch: int, block_size: int,
                   device: torch.device) -> list[Tile] | None:
    """The kernel calls of one segment pair cut into stretches (``stretches``), when each pair of
    stretches with an allowed entry is all allowed (one unmasked call) or, on the diagonal, exactly
    a causal square (``causal_square_tiles``); None otherwise, and the segment pair is planned on
    its blocks as a whole. So no call holds a masked entry outside a causal square, and masked
    keys reach only what they reached before (the README's caveat on non-finite keys). The pairs
    are classified all at once, as runs.
    """
    def spans(parts: list[Segment]) -> Spans:
        first = torch.tensor([p.global_start for p in parts], device=device)
        return Spans(first, first + torch.tensor([p.length for p in parts], device=device) - 1)

    cls = mask.classify(spans(q_parts), spans(k_parts)).expand(batch, len(q_parts), len(k_parts))
    full = (cls == FULL).all(0).tolist()
    live = (cls != EMPTY).any(0).nonzero().tolist()
    if any(not full[a][b] and q_parts[a] != k_parts[b] for a, b in live):
        return None  # decided from the classes alone, before any dense evaluation
    tiles = []
    for a, b in live:
        qs, ks = q_parts[a], k_parts[b]
        if full[a][b]:
            tiles.append(Tile(_rows(qs, 0, qs.length), _rows(ks, 0, ks.length), TileKind.FULL))
            continue
        blocks = Blocks(qs.global_start, qs.length, block_size, device)
        square = mask.classify(blocks, blocks)
        tile_mod = offset_mask_mod(mask.mask_mod, qs.global_start, qs.global_start)
        if not _is_causal_square(tile_mod, (square != EMPTY).any(0), (square == FULL).all(0), 0, blocks.count,
                                 Blocks(0, qs.length, block_size, device), batch):
            return None
        tiles += causal_square_tiles(qs, 0, qs.length, block_size)
    return tiles


def plan_segments(any_allowed: Tensor, all_allowed: Tensor, tile_mod: MaskMod, qs: Segment, ks: Segment,
                  block_size: int, dtype: torch.dtype) -> list[Tile]:
    """The kernel calls of one segment pair, decided by its block flags [B, Qb, KVb] (see the
    module doc); ``tile_mod`` is the mask in the segments' local positions.

    Dense masks are evaluated only where blocks are partial: diagonal blocks of a causal square,
    and the bands that need an additive mask.
    """
    used, full = any_allowed.any(0), all_allowed.all(0)
    if not used.any():
        return []
    batch = any_allowed.shape[0]
    (qb0, qb1), (kb0, kb1) = _index_span(used.any(1)), _index_span(used.any(0))
    (q0, q1), (k0, k1) = _elements(qs, qb0, qb1, block_size), _elements(ks, kb0, kb1, block_size)
    if full[qb0:qb1, kb0:kb1].all():
        return [Tile(_rows(qs, q0, q1), _rows(ks, k0, k1), TileKind.FULL)]
    square_blocks = Blocks(0, qs.length, block_size, used.device)
    if qs == ks and (q0, q1) == (k0, k1) and _is_causal_square(tile_mod, used, full, qb0, qb1, square_blocks, batch):
        return causal_square_tiles(qs, q0, q1, block_size)

    def causal(diagonal: Tensor) -> Tensor:
        return _causal_diagonal(tile_mod, square_blocks, diagonal, batch)

    tiles = []
    for rows, cols, kind in _band_calls(used, full, causal if qs == ks else None):
        q_span, k_span = _elements(qs, *rows, block_size), _elements(ks, *cols, block_size)
        if kind is TileKind.CAUSAL:
            tiles.append(Tile(_rows(qs, *q_span), _rows(ks, *k_span), TileKind.CAUSAL))
        else:
            tiles.append(_band_tile(tile_mod, batch, qs, ks, q_span, k_span, kind, dtype, used.device))
    return tiles


def causal_square_tiles(segment: Segment, start: int, stop: int, block_size: int) -> list[Tile]:
    """The calls of a causal square on the diagonal, elements [start, stop) of ``segment``: one call
    on the kernel's causal path when the square is at least ``CAUSAL_WHOLE_BLOCKS`` blocks long,
    else bands of ``BAND_BLOCKS`` blocks of rows, each an unmasked call over the square's
    keys before the band and a causal call over the band's own square (no additive mask).

    The CPU kernel's causal path skips only key blocks of 512 past a query block's last row, so
    on a short square it computes most of the upper triangle: measured in bfloat16 (blocks of
    128), a document of 820 tokens cost about 1.2x as much as one call as in bands of 256 rows,
    squares of 1024 and 2048 about 1.1x, and a square of 4096 no more.
    """
    if stop - start >= CAUSAL_WHOLE_BLOCKS * block_size:
        return [Tile(_rows(segment, start, stop), _rows(segment, start, stop), TileKind.CAUSAL)]
    band = BAND_BLOCKS * block_size
    tiles = []
    for r0 in range(start, stop, band):
        r1 = min(r0 + band, stop)
        if r0 > start:
            tiles.append(Tile(_rows(segment, r0, r1), _rows(segment, start, r0), TileKind.FULL))
        tiles.append(Tile(_rows(segment, r0, r1), _rows(segment, r0, r1), TileKind.CAUSAL))
    return tiles


def _is_causal_square(tile_mod: MaskMod, used: Tensor, full: Tensor, b0: int, b1: int, blocks: Blocks,
                      batch: int) -> bool:
    """Whether blocks [b0, b1) of a square on the diagonal hold exactly ``j <= i``: full below the
    diagonal, unused above it, and lower-triangular diagonal blocks (checked densely). ``used`` and
    ``full`` [Qb, KVb] may be exact flags or sound classes (a block called full is full)."""
    n = b1 - b0
    below = torch.ones(n, n, dtype=torch.bool, device=used.device).tril(-1)
    if not (full[b0:b1, b0:b1][below].all() and not used[b0:b1, b0:b1][below.T].any()):
        return False
    return bool(_causal_diagonal(tile_mod, blocks, torch.arange(b0, b1, device=used.device), batch).all())


def _causal_diagonal(tile_mod: MaskMod, blocks: Blocks, diagonal: Tensor, batch: int) -> Tensor:
    """Which diagonal blocks (``diagonal`` int64 [n], blocks of a square of ``blocks`` with
    itself) hold exactly ``j <= i`` in every batch row, checked densely: bool [n]."""

    def differs_from_causal(b, h, i, j):
        return tile_mod(b, h, i, j) != (j <= i)

    differs, _, _ = dense_block_flags(differs_from_causal, blocks, blocks, diagonal, diagonal, batch)
    return ~differs.any(0)


def _band_calls(used: Tensor, full: Tensor, causal: Callable[[Tensor], Tensor] | None
                ) -> list[tuple[tuple[int, int], tuple[int, int], TileKind]]:
    """The calls of a segment pair's blocks, as (q-block span, key-block span, ``TileKind``), from
    its block flags [Qb, KVb]; ``causal(b)``: which of the diagonal blocks ``b`` (int64 [n]) hold
    exactly ``j <= i``, None for a pair of two segments (no diagonal).

    Rows of q-blocks are planned in bands (``_row_bands``). In a band, a key block used by every
    row is covered by one call over the whole band: unmasked where every row sees all of it,
    masked otherwise; runs of such blocks of one kind share a call. A key block used by some rows
    only is covered row by row, each row's runs of full or of partial blocks in one call. So no call
    holds a block pair without an allowed entry (the README's caveat on non-finite keys). A band of
    two or more rows whose own square is exactly ``j <= i`` takes it first, as one call on the
    kernel's causal path. Python work is per band and run.
    """
    kind = used.to(torch.int8) + full.to(torch.int8)  # 0 unused, 1 partial, 2 full: [Qb, KVb]
    bands = _row_bands(kind)
    if not bands:
        return []
    spans = torch.tensor(bands, dtype=torch.long, device=kind.device)  # [bands, 2]
    band_of_row = torch.repeat_interleave(torch.arange(len(bands), device=kind.device), spans[:, 1] - spans[:, 0])
    rows = torch.cat([torch.arange(r0, r1, device=kind.device) for r0, r1 in bands])  # the bands' rows
    index = band_of_row[:, None].expand(-1, kind.shape[1])
    sub = kind[rows]
    least = sub.new_full((len(bands), kind.shape[1]), 2).scatter_reduce(0, index, sub, "amin")
    most = sub.new_zeros((len(bands), kind.shape[1])).scatter_reduce(0, index, sub, "amax")
    # Per band and key block: 2 every row full, 1 every row uses it, 3 some rows only, 0 none.
    shared = torch.where(least > 0, least, torch.where(most > 0, 3, 0)).to(torch.int8)
    calls = []
    if causal is not None:
        for n in _causal_bands(kind, spans, causal).tolist():
            r0, r1 = bands[n]
            calls.append(((r0, r1), (r0, r1), TileKind.CAUSAL))
            shared[n, r0:r1] = 0
    whole = shared.masked_fill(shared == 3, 0)
    for band, c0, c1, value in _runs(whole).tolist():
        calls.append((bands[band], (c0, c1), TileKind.FULL if value == 2 else TileKind.MASKED))
    alone = sub * (shared[band_of_row] == 3)
    for row, c0, c1, value in _runs(alone).tolist():
        r = int(rows[row])
        calls.append(((r, r + 1), (c0, c1), TileKind.FULL if value == 2 else TileKind.MASKED))
    # By rows, then keys: a band's calls run one after another (``ring.row_groups``).
    return sorted(calls, key=lambda call: call[:2])


def _causal_bands(kind: Tensor, spans: Tensor, causal: Callable[[Tensor], Tensor]) -> Tensor:
    """Indices of the bands [r0, r0 + 2) (``spans`` [bands, 2]) whose own square of ``kind``
    [Qb, Qb] is causal: full below the diagonal, unused above it, and both diagonal blocks exactly
    ``j <= i`` (``causal``, asked only for the bands that pass the first two). Only bands of two
    rows are looked at: longer ones are of equal rows, which no causal square has, when
    ``BAND_BLOCKS`` is 2."""
    r = spans[:, 0]
    candidate = (spans[:, 1] - r == 2).nonzero().flatten()
    r = r[candidate]
    candidate = candidate[(kind[r + 1, r] == 2) & (kind[r, r + 1] == 0)]
    r = spans[candidate, 0]
    if not r.numel():
        return candidate
    both = causal(torch.cat([r, r + 1])).view(2, -1).all(0)
    return candidate[both]


def _row_bands(kind: Tensor) -> list[tuple[int, int]]:
    """Bands [r0, r1) of used q-block rows: each run of equal rows of ``kind`` [Qb, KVb] is one
    band, and consecutive single rows that differ are paired into bands of ``BAND_BLOCKS`` rows
    (a sliding window's rows all differ: paired, each pair's calls serve twice the queries)."""
    new_band = torch.ones(kind.shape[0] + 1, dtype=torch.bool, device=kind.device)
    new_band[1:-1] = (kind[1:] != kind[:-1]).any(1)
    edges, live = new_band.nonzero().flatten().tolist(), (kind > 0).any(1).tolist()
    bands: list[list[int]] = []
    growing = False  # the last band is of single rows and can take another
    for r0, r1 in zip(edges, edges[1:]):
        if not live[r0]:
            continue
        if r1 - r0 == 1 and growing and bands[-1][1] == r0:
            bands[-1][1] = r1
            growing = r1 - bands[-1][0] < BAND_BLOCKS
            continue
        bands.append([r0, r1])
        growing = r1 - r0 == 1
    return [(r0, r1) for r0, r1 in bands]


def _runs(kind: Tensor) -> Tensor:
    """Maximal [start, stop) stretches of equal nonzero values in each row of ``kind`` [R, C]:
    int64 [runs, 4] rows of (row, start, stop, value), by row then start."""
    padded = torch.nn.functional.pad(kind, (1, 1))
    rows, edges = (padded[:, 1:] != padded[:, :-1]).nonzero(as_tuple=True)  # a value starts at each edge
    values = padded[rows, edges + 1].long()
    stops = edges.roll(-1)  # a nonzero stretch always ends at the row's next edge
    keep = values != 0
    return torch.stack([rows[keep], edges[keep], stops[keep], values[keep]], 1)


def _band_tile(tile_mod: MaskMod, batch: int, qs: Segment, ks: Segment, rows: tuple[int, int],
               cols: tuple[int, int], kind: TileKind, dtype: torch.dtype, device: torch.device) -> Tile:
    """One call of ``kind`` full or masked: unmasked over full blocks (or partial ones that turn out
    all allowed), else with an additive mask of just this region."""
    q_rows, kv_rows = _rows(qs, *rows), _rows(ks, *cols)
    if kind is TileKind.FULL:
        return Tile(q_rows, kv_rows, TileKind.FULL)
    region = evaluate_mask(offset_mask_mod(tile_mod, rows[0], cols[0]), batch, rows[1] - rows[0],
                           cols[1] - cols[0], device)
    return _masked_tile(q_rows, kv_rows, region, dtype)


def _masked_tile(q_rows: slice, kv_rows: slice, allowed: Tensor, dtype: torch.dtype) -> Tile:
    """The call over ``q_rows`` x ``kv_rows`` letting through ``allowed`` [B or 1, 1, q, kv]:
    unmasked when all are allowed, else with an additive mask and its dead rows."""
    if allowed.all():
        return Tile(q_rows, kv_rows, TileKind.FULL)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
    dead = ~allowed.any(-1)
    return Tile(q_rows, kv_rows, TileKind.MASKED, bias, dead if dead.any() else None)


def _elements(segment: Segment, b0: int, b1: int, block_size: int) -> tuple[int, int]:
    """[start, stop) of ``segment``'s elements that its blocks [b0, b1) hold (the last may be short)."""
    return b0 * block_size, min(b1 * block_size, segment.length)


def _rows(segment: Segment, start: int, stop: int) -> slice:
    """Local rows of ``segment``'s elements [start, stop)."""
    return slice(segment.local_start + start, segment.local_start + stop)


def evaluate_mask(mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """``mask_mod`` on every (b, q, kv) of a q_len x kv_len grid: bool [batch, 1, q_len, kv_len]."""
    q_idx = torch.arange(q_len, device=device).view(1, -1, 1)
    kv_idx = torch.arange(kv_len, device=device).view(1, 1, -1)
    return evaluate_at(mask_mod, batch, q_idx, kv_idx)


def evaluate_at(mask_mod: MaskMod, batch: int, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """``mask_mod`` at index grids that broadcast to [n, Q, KV], for every batch row: bool
    [batch, n, Q, KV] (the grids' leading dim stands in flex's head dim, which no mask reads).

    Broadcasting instead of flex's vmap: vmap fails inside a compiled graph's runtime wrappers.
    """
    b = torch.arange(batch, device=q_idx.device).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=q_idx.device)
    shape = torch.broadcast_shapes(q_idx.shape, kv_idx.shape)
    return mask_mod(b, h, q_idx.unsqueeze(0), kv_idx.unsqueeze(0)).expand(batch, *shape)


def block_mask_from_flags(any_allowed: Tensor, all_allowed: Tensor, block_size: int, mask_mod: MaskMod,
                          seq_lengths: tuple[int, int]) -> BlockMask:
    """The flex BlockMask with these block flags, as ``create_block_mask`` would build it."""
    partial, full = any_allowed & ~all_allowed, all_allowed
    kv_num, kv_idx = _sparse_rows(partial)
    full_kv_num, full_kv_idx = _sparse_rows(full)
    q_num, q_idx = _sparse_rows(partial.transpose(-1, -2))
    full_q_num, full_q_idx = _sparse_rows(full.transpose(-1, -2))
    return BlockMask(seq_lengths=tuple(seq_lengths), kv_num_blocks=kv_num, kv_indices=kv_idx,
                     full_kv_num_blocks=full_kv_num, full_kv_indices=full_kv_idx,
                     q_num_blocks=q_num, q_indices=q_idx, full_q_num_blocks=full_q_num,
                     full_q_indices=full_q_idx, BLOCK_SIZE=(block_size, block_size), mask_mod=mask_mod)


def _sparse_rows(flags: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of block flags [B, H, Qb, KVb]: how many are set, and their indices first."""
    num = flags.sum(-1, dtype=torch.int32)
    idx = flags.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx


def _index_span(flags: Tensor) -> tuple[int, int]:
    """[first, last + 1) of the set entries of a 1-D flag vector (which has one)."""
    idx = flags.nonzero().flatten()
    return int(idx[0]), int(idx[-1]) + 1


def split_tile(tile: Tile, q_cuts, kv_cuts) -> list[Tile]:
    """``tile`` cut at query rows ``q_cuts`` and key rows ``kv_cuts`` (in the tile's own row
    numbers; cuts outside it are ignored) into the same work: sub-tiles with no allowed entry
    are dropped, masked ones become full when all their entries are allowed.

    A causal square is cut at the union of both cuts on both sides, so every piece is again a
    causal square (on the diagonal), full (below it) or empty (above it). Masked sub-tiles keep
    views of the tile's additive mask: cutting adds no mask memory.
    """
    q0, q1, k0, k1 = tile.q_rows.start, tile.q_rows.stop, tile.kv_rows.start, tile.kv_rows.stop
    qc = sorted({c - q0 for c in q_cuts if q0 < c < q1})
    kc = sorted({c - k0 for c in kv_cuts if k0 < c < k1})
    if tile.kind is TileKind.CAUSAL:
        qc = kc = sorted(set(qc) | set(kc))
    if not qc and not kc:
        return [tile]
    q_bounds, k_bounds = [0, *qc, q1 - q0], [0, *kc, k1 - k0]
    parts = []
    for c, d in zip(k_bounds, k_bounds[1:]):
        for a, b in zip(q_bounds, q_bounds[1:]):
            part = _sub_tile(tile, a, b, c, d)
            if part is not None:
                parts.append(part)
    return parts


def _sub_tile(tile: Tile, a: int, b: int, c: int, d: int) -> Tile | None:
    """Rows [a, b) x columns [c, d) of ``tile`` (relative to its corner) as a tile; None when no
    entry there is allowed. For a causal tile the cut is on the diagonal or off it (``split_tile``)."""
    rows = slice(tile.q_rows.start + a, tile.q_rows.start + b)
    cols = slice(tile.kv_rows.start + c, tile.kv_rows.start + d)
    if tile.kind is TileKind.FULL:
        return Tile(rows, cols, TileKind.FULL)
    if tile.kind is TileKind.CAUSAL:
        if c >= b:
            return None
        return Tile(rows, cols, TileKind.CAUSAL if (a, b) == (c, d) else TileKind.FULL)
    bias = tile.bias[..., a:b, c:d]
    blocked = bias == float("-inf")
    if blocked.all():
        return None
    if not blocked.any():
        return Tile(rows, cols, TileKind.FULL)
    dead = blocked.all(-1)
    return Tile(rows, cols, TileKind.MASKED, bias, dead if dead.any() else None)
