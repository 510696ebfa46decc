"""The aten kernel's calls: dense tiles of (local queries x visiting key rows), each unmasked, on
the kernel's causal path, or with an additive mask over partial blocks only.

Packed causal documents are planned one by one: the segments are cut at document starts into
stretches (``stretches``). When every pair of stretches with an allowed entry is all allowed or
exactly a causal square (a document the segment pair holds whole, with no padding or image in
it), each becomes unmasked and causal calls (no additive mask), and the part of a document that
continues from an earlier segment is one full rectangle; otherwise the segment pair is planned
on its blocks (``plan_segments``). Cutting changes only which calls cover the allowed pairs.

- no allowed block                 -> skipped, no kernel call;
- every entry allowed              -> one unmasked call over the allowed blocks' span;
- the causal square                -> one call on the kernel's causal path;
- otherwise, per band of q-blocks  -> a band is a run of equal rows of blocks, or two rows that
                                      differ (``_band_calls``): one call per run of key blocks of
                                      one kind, unmasked over blocks all its rows see whole, with
                                      an additive mask over blocks every row uses in part; a block
                                      only some rows use is a call of those rows; a band's own
                                      causal square runs on the kernel's causal path. Masks thus
                                      cover partial blocks (and a band's edge blocks) only:
                                      O(L x block), not L^2, for a sliding window, causal with
                                      padding, or packed documents.

Shape legend: B batch rows of the masks (1 when no metadata matters), Qb / KVb query / key
blocks of a segment pair.
"""

from __future__ import annotations

import bisect
from enum import Enum
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ..layout import Segment
from .blocks import EMPTY, FULL, Blocks, Spans
from .flags import Evaluated, block_indices, segment_evaluation
from .masks import Mask
from .rows import Rows, block_elements, runs, segment_rows

# In blocks: a causal square this long is one call; a shorter one is cut into bands of rows this high.
CAUSAL_WHOLE_BLOCKS, BAND_BLOCKS = 16, 2


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


def stretches(segment: Segment, cuts: tuple[int, ...], min_length: int) -> list[Segment]:
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
    cls = mask.classify(Spans.of(q_parts, device), Spans.of(k_parts, device)).expand(batch, len(q_parts), len(k_parts))
    full = (cls == FULL).all(0).tolist()
    live = (cls != EMPTY).any(0).nonzero().tolist()
    if any(not full[a][b] and q_parts[a] != k_parts[b] for a, b in live):
        return None  # decided from the classes alone, before any dense evaluation
    tiles = []
    for a, b in live:
        qs, ks = q_parts[a], k_parts[b]
        if full[a][b]:
            tiles.append(Tile(segment_rows(qs, 0, qs.length), segment_rows(ks, 0, ks.length), TileKind.FULL))
            continue
        blocks = Blocks(qs.global_start, qs.length, block_size, device)
        square = mask.classify(blocks, blocks)

        def causal(diagonal: Tensor) -> Tensor:  # classed causal, only diagonal blocks are partial
            return causal_diagonal(segment_evaluation(mask, blocks, blocks, batch)[1], blocks, diagonal)

        if not _is_causal_square(causal, (square != EMPTY).any(0), (square == FULL).all(0), 0, blocks.count):
            return None
        tiles += causal_square_tiles(qs, 0, qs.length, block_size)
    return tiles


def plan_segments(any_allowed: Tensor, all_allowed: Tensor, evaluated: Evaluated, qs: Segment, ks: Segment,
                  block_size: int, dtype: torch.dtype) -> list[Tile]:
    """The kernel calls of one segment pair, decided by its block flags [B, Qb, KVb] (see the
    module doc); ``evaluated``: the mask entry by entry where the flags were found.

    Dense masks are read only where blocks are partial: diagonal blocks of a causal square, and
    the bands that need an additive mask; nothing is evaluated again.
    """
    used, full = any_allowed.any(0), all_allowed.all(0)
    if not used.any():
        return []
    (qb0, qb1), (kb0, kb1) = _index_span(used.any(1)), _index_span(used.any(0))
    (q0, q1), (k0, k1) = block_elements(qs, qb0, qb1, block_size), block_elements(ks, kb0, kb1, block_size)
    if full[qb0:qb1, kb0:kb1].all():
        return [Tile(segment_rows(qs, q0, q1), segment_rows(ks, k0, k1), TileKind.FULL)]
    square_blocks = Blocks(0, qs.length, block_size, used.device)

    def causal(diagonal: Tensor) -> Tensor:
        return causal_diagonal(evaluated, square_blocks, diagonal)

    if qs == ks and (q0, q1) == (k0, k1) and _is_causal_square(causal, used, full, qb0, qb1):
        return causal_square_tiles(qs, q0, q1, block_size)
    tiles = []
    for rows, cols, kind in _band_calls(used, full, causal if qs == ks else None):
        q_span, k_span = block_elements(qs, *rows, block_size), block_elements(ks, *cols, block_size)
        q_rows, kv_rows = segment_rows(qs, *q_span), segment_rows(ks, *k_span)
        if kind is TileKind.MASKED:
            allowed = evaluated.region(rows, cols, q_span[1] - q_span[0], k_span[1] - k_span[0])
            tiles.append(_masked_tile(q_rows, kv_rows, allowed, dtype))
        else:
            tiles.append(Tile(q_rows, kv_rows, kind))
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
        return [Tile(segment_rows(segment, start, stop), segment_rows(segment, start, stop), TileKind.CAUSAL)]
    band = BAND_BLOCKS * block_size
    tiles = []
    for r0 in range(start, stop, band):
        r1 = min(r0 + band, stop)
        if r0 > start:
            tiles.append(Tile(segment_rows(segment, r0, r1), segment_rows(segment, start, r0), TileKind.FULL))
        tiles.append(Tile(segment_rows(segment, r0, r1), segment_rows(segment, r0, r1), TileKind.CAUSAL))
    return tiles


def _is_causal_square(causal: Callable[[Tensor], Tensor], used: Tensor, full: Tensor, b0: int, b1: int) -> bool:
    """Whether blocks [b0, b1) of a square on the diagonal hold exactly ``j <= i``: full below the
    diagonal, unused above it, and lower-triangular diagonal blocks (``causal(b)``: which of the
    diagonal blocks ``b``, int64 [n], do, bool [n]). ``used`` and ``full`` [Qb, KVb] may be exact
    flags or sound classes (a block called full is full)."""
    n = b1 - b0
    below = torch.ones(n, n, dtype=torch.bool, device=used.device).tril(-1)
    if not (full[b0:b1, b0:b1][below].all() and not used[b0:b1, b0:b1][below.T].any()):
        return False
    return bool(causal(torch.arange(b0, b1, device=used.device)).all())


def causal_diagonal(evaluated: Evaluated, blocks: Blocks, diagonal: Tensor) -> Tensor:
    """Which diagonal blocks (``diagonal`` int64 [n], blocks of a square of ``blocks`` with itself)
    hold exactly ``j <= i`` in every batch row, read from the square's evaluation: bool [n]."""
    first, last = blocks.bounds()
    position, _ = block_indices(first[diagonal], last[diagonal], blocks.size)  # [n, size], as evaluated
    causal = position[:, None, :] <= position[:, :, None]  # [n, size, size]
    return (evaluated.entries(diagonal, diagonal) == causal).flatten(2).all(-1).all(0)


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
    for band, c0, c1, value in runs(whole).tolist():
        calls.append((bands[band], (c0, c1), TileKind.FULL if value == 2 else TileKind.MASKED))
    alone = sub * (shared[band_of_row] == 3)
    for row, c0, c1, value in runs(alone).tolist():
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


def _masked_tile(q_rows: slice, kv_rows: slice, allowed: Tensor, dtype: torch.dtype) -> Tile:
    """The call over ``q_rows`` x ``kv_rows`` letting through ``allowed`` [B or 1, 1, q, kv]:
    unmasked when all are allowed, else with an additive mask and its dead rows."""
    if allowed.all():
        return Tile(q_rows, kv_rows, TileKind.FULL)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
    dead = ~allowed.any(-1)
    return Tile(q_rows, kv_rows, TileKind.MASKED, bias, dead if dead.any() else None)


def _index_span(flags: Tensor) -> tuple[int, int]:
    """[first, last + 1) of the set entries of a 1-D flag vector (which has one)."""
    idx = flags.nonzero().flatten()
    return int(idx[0]), int(idx[-1]) + 1


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
