"""How a sequence is split across context-parallel ranks.

Every layout gives each rank the same number of tokens, L = S / P, as a few globally contiguous
runs (``segments``). Four kinds:

- ``contiguous``: rank r holds the r-th of P equal pieces.
- ``zigzag``: rank r holds the r-th and the (2P-1-r)-th of 2P equal pieces, which balances the
  causal work of one document.
- ``balanced``: computed from a batch's metadata (``Layout.balanced``) so that the work of
  packed documents, under one causal layer or a model's mix of layers, is balanced; it holds its
  positions as a tensor and changes every batch.
- ``explicit``: any positions the caller gives (``Layout.from_positions``), held the same way.

Whatever the kind, the op receives the layout as one int64 tensor, ``table(S)``: the global
positions of rank 0's tokens in local order, then rank 1's, ... (rank-major, [S]). A tensor,
not Python values, so that a compiled model sees one graph for every balanced layout.

Shape legend: B batch rows, S whole sequence, P ranks, L = S / P tokens per rank.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, NamedTuple, Sequence

import torch
from torch import Tensor

from .planning.flags import DENSE_CHUNK, evaluate_at
from .planning.flexmask import FlexMask
from .planning.masks import MaskSpec
from .planning.metadata import document_starts

FIXED_LAYOUTS = ("contiguous", "zigzag")
TABLE_LAYOUTS = ("balanced", "explicit")
LAYOUTS = FIXED_LAYOUTS + TABLE_LAYOUTS
BALANCE_GRAIN = 128  # the planner's block size: balanced pieces are whole blocks where they can be
# Of a rank's mean work: the largest left-over item handed out whole, and how much more work a rank
# holding a neighbouring run may have and still be preferred (fewer segments).
PIECE_SHARE, SLACK_SHARE = 0.03, 0.01
# A candidate layout with fewer segments is preferred when its busiest rank's work is at most this
# much more (relative, so that scaling the layer counts changes nothing) than the best candidate's:
# planning grows with the pairs of segments (the stack bench at S = 16384, P = 4: 15 segments on a
# rank planned 3.6 s of a 7.7 s step, zigzag's 2 took 0.26 s of 4.2 s; docs/benchmarks.md) and
# every segment adds kernel calls and, in a sliding layer, a halo.
SEGMENT_SLACK = Fraction(1, 50)
# More than zigzag's two runs on a rank cost more than the balance they buy when the best candidate
# holding at most two a rank is within this much (relative, as above) of the best: the stack bench
# at S = 16384, P = 4, `long_four`: five segments a rank sent 4.92 MB per rank and layer against
# 2.88 MB and took 5% more CPU over all ranks, and stepped 1.05-1.07x slower than zigzag; two runs
# of uneven widths (1.09 of the best work) stepped 0.97x (docs/benchmarks.md).
TWO_RUN_SLACK = Fraction(1, 10)


# A model's layers by mask: (mask, how many layers use it).
LayerMix = Sequence[tuple[MaskSpec | FlexMask, int]]


def layer_mix(masks: Iterable[MaskSpec | FlexMask]) -> list[tuple[MaskSpec | FlexMask, int]]:
    """A stack's masks, one per layer, as (distinct mask, layer count) pairs in first-seen order:
    the ``masks`` of ``Layout.balanced``. FlexMasks are one mask when they have one factory name
    and the very same tensors (every chunked layer's mask of a batch)."""
    def key(mask):
        return (mask.name, tuple(map(id, mask.tensors.values()))) if isinstance(mask, FlexMask) else mask

    first: dict = {}
    counts: Counter = Counter()
    for mask in masks:
        first.setdefault(key(mask), mask)
        counts[key(mask)] += 1
    return [(mask, counts[k]) for k, mask in first.items()]


class Segment(NamedTuple):
    """A run of a rank's tokens that is contiguous in the global sequence."""

    local_start: int
    global_start: int
    length: int


@dataclass(frozen=True, eq=False)
class Layout:
    """Sharding of a length-S sequence over ``world_size`` ranks.

    ``Layout("contiguous", P)`` and ``Layout("zigzag", P)`` fit any length that splits into equal
    pieces. ``Layout.balanced(info, P)`` and ``Layout.from_positions(positions, P)`` fit the one
    length of their ``permutation``.

    Args:
        kind: "contiguous", "zigzag", "balanced" or "explicit".
        world_size: number of ranks P.
        permutation: for "balanced" and "explicit" only: int64 [S], every rank's global positions
            in local order, rank-major (a permutation of 0 .. S-1, checked when first read).

    Equality: fixed kinds by (kind, world_size); table kinds by their permutation's content.
    """

    kind: str
    world_size: int
    permutation: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ValueError(f"Layout kind must be one of {LAYOUTS}, got {self.kind!r}")
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"Layout world_size must be a positive int, got {self.world_size!r}")
        if self.kind in FIXED_LAYOUTS:
            if self.permutation is not None:
                raise ValueError(f"a {self.kind} layout takes no permutation")
            return
        # Shape and dtype only: the content may be a tracing placeholder (pytree unflattening).
        p = self.permutation
        if not isinstance(p, Tensor) or p.dim() != 1 or p.dtype != torch.int64:
            shown = f"{p.dtype} {tuple(p.shape)}" if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(f"a {self.kind} layout needs a permutation: an int64 [S] tensor, got {shown}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def balanced(cls, info, world_size: int, block_size: int | None = None, *,
                 masks: LayerMix | None = None) -> "Layout":
        """A layout that balances the work of ``info``'s packed documents over the ranks, for one
        causal layer or for a model's mix of layers (``masks``).

        Work is counted per query as the keys it sees within its document, summed over the
        batch rows (one layout serves the whole batch): under a causal mask without ``masks``;
        with ``masks``, over the model's kinds of layer, each kind's layer count x the keys its
        mask lets the query see (a sliding window caps them at W). For a Gemma 4 stack pass
        ``masks=[(MaskSpec(sliding_window=W), 5), (MaskSpec(), 1)]``, or per model
        ``hf.ring_layer_mix(model)``.

        Every rank gets S / P tokens. Each stretch without a document boundary in any row, if it
        holds at least 2P blocks of ``block_size`` tokens (default: 128, less when a rank holds
        few tokens), is split head-tail, as zigzag splits a whole sequence: rank r gets its r-th
        and (2P-1-r)-th of 2P pieces of whole blocks, as equal as blocks allow. What is left over
        (shorter stretches, whole, and each long stretch's middle, under 2 blocks) goes out
        heaviest first to the least-loaded rank with room, preferring a rank that holds a
        neighbouring run (fewer segments); an item no rank has room for is split. A second
        candidate splits head-tail only the stretches heavier than a rank's share of the work
        (fewer cuts, the rest placed whole where it fits); zigzag and contiguous pieces are the
        others, and a zigzag of uneven pieces: two runs a rank, a head and a tail whose widths are
        chosen rank by rank, outermost first, for work nearest the mean still to place. Segments
        cost planning (per pair of segments) and kernel calls (per layer), so of the candidates
        whose busiest rank has at most ``1 + SEGMENT_SLACK`` times the least such work, the one
        with the fewest segments wins, then the one whose busiest rank has the least work; if it
        still gives some rank more than two runs, the least busy candidate with at most two a rank
        takes its place when within ``1 + TWO_RUN_SLACK`` of the least work. Every rank computes
        the same layout from the same metadata, without communication.

        Args:
            info: the batch's whole-sequence ``SequenceInfo`` (only ``document_ids`` is read).
            world_size: number of ranks P; S must be a positive multiple of P.
            block_size: the grain of the pieces.
            masks: the model's layers as (``MaskSpec`` or ``FlexMask``, number of layers) pairs;
                None counts one causal layer. Padding and image blocks are not weighed. A
                FlexMask's keys are counted by evaluating its mask_mod on every (query, key)
                pair: O(B S^2) per layout.

        Raises:
            ValueError: S is not a positive multiple of P, or ``masks`` is not (MaskSpec or
                FlexMask, positive count) pairs.
        """
        document_ids = info.document_ids if hasattr(info, "document_ids") else info
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"Layout world_size must be a positive int, got {world_size!r}")
        if masks is not None and not _is_layer_mix(masks):
            raise ValueError(f"Layout.balanced masks must be (MaskSpec or FlexMask, positive int) pairs, at least one, got {masks!r}")
        runs = balanced_runs(document_ids.detach().cpu(), world_size, block_size, masks)
        return cls("balanced", world_size, torch.cat([torch.arange(a, b) for rank in runs for a, b in rank]))

    @classmethod
    def from_positions(cls, positions: Tensor, world_size: int) -> "Layout":
        """A layout from explicit rank-major global positions (int64 [S]); see ``table``."""
        return cls("explicit", world_size, positions.to(torch.int64))

    # ------------------------------------------------------------------ queries

    @property
    def pieces_per_rank(self) -> int:
        return 2 if self.kind == "zigzag" else 1

    @property
    def seq_len(self) -> int | None:
        """The one length a table layout fits; None for the fixed kinds (any length that splits)."""
        return None if self.permutation is None else self.permutation.shape[0]

    def check_length(self, seq_len: int) -> None:
        """Raise ValueError unless this layout can split ``seq_len`` tokens."""
        if self.permutation is not None:
            if seq_len != self.seq_len:
                raise ValueError(f"this {self.kind} layout is for a sequence of {self.seq_len} tokens, got {seq_len}")
            if seq_len < self.world_size or seq_len % self.world_size:
                raise ValueError(f"{self.kind} layout over {self.world_size} ranks needs a sequence length that is "
                                 f"a positive multiple of {self.world_size}, got {seq_len}")
            return
        pieces = self.world_size * self.pieces_per_rank
        if seq_len < pieces or seq_len % pieces:
            raise ValueError(
                f"{self.kind} layout over {self.world_size} ranks needs a sequence length that is a "
                f"positive multiple of {pieces}, got {seq_len}"
            )

    def table(self, seq_len: int) -> Tensor:
        """The layout as the op takes it: int64 [S] on the CPU, rank 0's global positions in local
        order, then rank 1's, ... Built from tensor operations only (no data read), so that it
        traces into a compiled graph; a table layout returns its ``permutation``."""
        if self.permutation is not None:
            return self.permutation
        if self.kind == "contiguous":
            return torch.arange(seq_len)
        p = self.world_size
        piece = seq_len // (2 * p)
        order = torch.tensor([[r, 2 * p - 1 - r] for r in range(p)]).view(p, 2, 1)
        return (order * piece + torch.arange(piece)).flatten()

    def segments(self, seq_len: int, rank: int) -> tuple[Segment, ...]:
        """The globally contiguous runs of ``rank``'s tokens, in local order."""
        self.check_length(seq_len)
        self._check_rank(rank)
        if self.permutation is not None:
            return self._table_segments()[rank]
        piece = seq_len // (self.world_size * self.pieces_per_rank)
        if self.kind == "contiguous":
            return (Segment(0, rank * piece, piece),)
        mirror = 2 * self.world_size - 1 - rank
        return (Segment(0, rank * piece, piece), Segment(piece, mirror * piece, piece))

    def positions(self, seq_len: int, rank: int) -> Tensor:
        """Global positions (int64 [S / P]) of ``rank``'s tokens, in local order."""
        return torch.cat([torch.arange(s.global_start, s.global_start + s.length)
                          for s in self.segments(seq_len, rank)])

    def shard(self, x: Tensor, dim: int, rank: int) -> Tensor:
        """``rank``'s part of the whole-sequence tensor ``x`` along ``dim``."""
        seq_len = x.shape[dim]
        parts = [x.narrow(dim, s.global_start, s.length) for s in self.segments(seq_len, rank)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def unshard(self, xs: Sequence[Tensor], dim: int) -> Tensor:
        """Reassemble the whole sequence from every rank's part (rank order)."""
        if len(xs) != self.world_size:
            raise ValueError(f"unshard needs {self.world_size} parts, got {len(xs)}")
        seq_len = sum(x.shape[dim] for x in xs)
        pieces: list[tuple[int, Tensor]] = []
        for rank, x in enumerate(xs):
            for s in self.segments(seq_len, rank):
                pieces.append((s.global_start, x.narrow(dim, s.local_start, s.length)))
        return torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], dim=dim)

    # ------------------------------------------------------------------ equality

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Layout):
            return NotImplemented
        if (self.kind, self.world_size) != (other.kind, other.world_size):
            return False
        if self.permutation is None or other.permutation is None:
            return self.permutation is other.permutation
        return self.permutation is other.permutation or (self.permutation.shape == other.permutation.shape
                                                     and bool(torch.equal(self.permutation, other.permutation)))

    def __hash__(self) -> int:
        return hash((self.kind, self.world_size))

    # ------------------------------------------------------------------ internals

    def _table_segments(self) -> tuple[tuple[Segment, ...], ...]:
        """Per rank, the runs of the positions table (read and checked once per object)."""
        cached = self.__dict__.get("_segments")
        if cached is None:
            cached = segments_from_table(self.permutation, self.world_size)
            object.__setattr__(self, "_segments", cached)
        return cached

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")


def table_problems(table: Tensor, world_size: int) -> list[str]:
    """What keeps ``table`` from being a layout over ``world_size`` ranks (empty when fine)."""
    if table.dim() != 1 or table.dtype != torch.int64:
        return [f"the layout table must be int64 [S], got {table.dtype} {tuple(table.shape)}"]
    seq_len = table.shape[0]
    if seq_len < world_size or seq_len % world_size:
        return [f"the layout table's length {seq_len} is not a positive multiple of {world_size} ranks"]
    t = table.detach().cpu()
    if bool(((t < 0) | (t >= seq_len)).any()) or bool((torch.bincount(t, minlength=seq_len) != 1).any()):
        return [f"the layout table is not a permutation of 0 .. {seq_len - 1}"]
    return []


def segments_from_table(table: Tensor, world_size: int) -> tuple[tuple[Segment, ...], ...]:
    """Per rank, the globally contiguous runs of its rows of a rank-major positions ``table``.

    Raises:
        ValueError: ``table`` is not a permutation of 0 .. S-1 whose length P divides.
    """
    problems = table_problems(table, world_size)
    if problems:
        raise ValueError(problems[0])
    t = table.detach().cpu()
    local = t.shape[0] // world_size
    rows = t.view(world_size, local)
    # A run starts at a rank's first token and wherever a position does not follow its predecessor.
    starts = torch.ones(world_size, local, dtype=torch.bool)
    starts[:, 1:] = rows[:, 1:] != rows[:, :-1] + 1
    result = []
    for rank, row in enumerate(rows):
        edges = starts[rank].nonzero().flatten().tolist() + [local]
        firsts = row[edges[:-1]].tolist()
        result.append(tuple(Segment(a, g, b - a) for a, b, g in zip(edges, edges[1:], firsts)))
    return tuple(result)


def document_work(document_ids: Tensor, masks: LayerMix | None = None) -> Tensor:
    """Per position, the work of its query: over the layer mix ``masks`` ((mask, layer count)
    pairs; None: one causal layer), the sum of count x the keys the query sees under that mask
    within its document, summed over rows. A document boundary is any change of id between
    neighbours; padding and image blocks are not read.

    Shapes: document_ids [B, S] -> int64 [S].
    """
    first, end = document_bounds(document_ids)
    mix = ((MaskSpec(), 1),) if masks is None else masks
    return sum(count * (flex_keys_seen(spec, first) if isinstance(spec, FlexMask) else keys_seen(spec, first, end))
               for spec, count in mix).sum(0)


def document_bounds(document_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per position, the first position of its document and the position after its last (the
    first of the reversed row's document, mirrored).

    Shapes: document_ids [B, S] -> (first, end), int64 [B, S] each.
    """
    return document_starts(document_ids), document_ids.shape[1] - document_starts(document_ids.flip(1)).flip(1)


def keys_seen(spec: MaskSpec, first: Tensor, end: Tensor) -> Tensor:
    """Per position, the keys its query sees under ``spec`` within its document [first, end):
    causal keys up to the query, a window of W keys back (causal) or W either side (not causal).

    Shapes: first, end [B, S] -> int64 [B, S].
    """
    index = torch.arange(first.shape[1])
    window = spec.sliding_window
    stop = index + 1 if spec.causal else end if window is None else torch.minimum(end, index + window + 1)
    start = first if window is None else torch.maximum(first, index - window + (1 if spec.causal else 0))
    return stop - start


def flex_keys_seen(mask: FlexMask, first: Tensor) -> Tensor:
    """Per position, the keys its query sees under the FlexMask ``mask`` within its document
    (``first``: its document's first position), counted by evaluating the mask_mod on every
    (query, key) pair, at most ``DENSE_CHUNK`` at a time.

    Shapes: first [B, S] -> int64 [B, S].
    """
    rows, seq_len = first.shape
    mask_mod = mask.factory(**{k: t.cpu() for k, t in mask.tensors.items()})
    keys = torch.arange(seq_len).view(1, 1, -1)
    step = max(1, DENSE_CHUNK // (rows * seq_len))
    counts = []
    for start in range(0, seq_len, step):
        queries = torch.arange(start, min(start + step, seq_len))
        allowed = evaluate_at(mask_mod, rows, queries.view(1, -1, 1), keys)[:, 0]  # [B, queries, S]
        same = first[:, queries, None] == first[:, None, :]
        counts.append((allowed & same).sum(-1))
    return torch.cat(counts, 1)


def balanced_runs(document_ids: Tensor, world_size: int, block_size: int | None = None,
                  masks: LayerMix | None = None) -> list[list[tuple[int, int]]]:
    """Per rank, its [start, stop) runs of global positions, ascending and merged (see
    ``Layout.balanced``). Pure function of ``document_ids`` [B, S] and the layer mix ``masks``."""
    if document_ids.dim() != 2:
        raise ValueError(f"document_ids must be [B, S], got shape {tuple(document_ids.shape)}")
    p = world_size
    seq_len = document_ids.shape[1]
    if seq_len < p or seq_len % p:
        raise ValueError(f"balanced layout over {p} ranks needs a sequence length that is a positive multiple "
                         f"of {p}, got {seq_len}")
    local = seq_len // p
    grain = block_size if block_size is not None else min(BALANCE_GRAIN, max(1, local // (2 * p)))
    work = document_work(document_ids, masks)
    cum = torch.cat([torch.zeros(1, dtype=torch.int64), work.cumsum(0)]).tolist()
    boundary = (document_ids[:, 1:] != document_ids[:, :-1]).any(0).nonzero().flatten() + 1
    edges = [0, *boundary.tolist(), seq_len]
    # Every long stretch split head-tail; or only those heavier than a rank's share (the others
    # placed whole where they can, fewer cuts); or, where the packing needs no care, zigzag or
    # contiguous pieces; or zigzag's two runs a rank, of widths that balance the work.
    candidates = [_placed_runs(edges, cum, p, grain, split_from) for split_from in (0, cum[-1] / p)]
    if seq_len % (2 * p) == 0:
        w = seq_len // (2 * p)
        candidates.append([_merged([(r * w, (r + 1) * w), ((2 * p - 1 - r) * w, (2 * p - r) * w)]) for r in range(p)])
    candidates.append(_uneven_zigzag_runs(cum, p, grain))
    candidates.append([[(r * local, (r + 1) * local)] for r in range(p)])
    return _fewest_segments_near_best(candidates, cum)


def _fewest_segments_near_best(candidates: list[list[list[tuple[int, int]]]], cum: list[int]
                               ) -> list[list[tuple[int, int]]]:
    """Of ``candidates`` (per rank, its runs), those whose busiest rank's work (``cum``: prefix
    sums of the per-position work, [S + 1]) is within ``SEGMENT_SLACK`` of the least; of these the
    one with the fewest segments, then the least work on its busiest rank, then the first. When
    that one gives some rank more than two runs, the candidate with at most two runs a rank whose
    busiest rank has the least work replaces it if within ``TWO_RUN_SLACK`` of the least."""
    busiest = [max(sum(cum[b] - cum[a] for a, b in rank) for rank in c) for c in candidates]
    least = min(busiest)
    near = [n for n, most in enumerate(busiest) if most <= least * (1 + SEGMENT_SLACK)]
    pick = min(near, key=lambda n: (sum(len(rank) for rank in candidates[n]), busiest[n], n))
    two_runs = [n for n, c in enumerate(candidates) if max(len(rank) for rank in c) <= 2
                and busiest[n] <= least * (1 + TWO_RUN_SLACK)]
    if max(len(rank) for rank in candidates[pick]) > 2 and two_runs:
        pick = min(two_runs, key=lambda n: (busiest[n], n))
    return candidates[pick]


def _uneven_zigzag_runs(cum: list[int], p: int, grain: int) -> list[list[tuple[int, int]]]:
    """Per rank, zigzag's two runs with widths chosen for the work (``cum``: prefix sums of the
    per-position work, [S + 1]): outermost first, rank r takes a head [lo, lo + h) and a tail
    [hi - (L - h), hi) of what is left, [lo, hi), with h in whole grains (or L) making its work
    nearest the mean work left per rank; the last rank takes the middle run."""
    local = (len(cum) - 1) // p
    prefix = torch.tensor(cum)
    widths = torch.unique(torch.cat([torch.arange(0, local + 1, grain), torch.tensor([local])]))  # [widths]
    runs, lo, hi = [], 0, len(cum) - 1
    for r in range(p - 1):
        work = prefix[lo + widths] - cum[lo] + cum[hi] - prefix[hi - local + widths]  # [widths]
        h = int(widths[int((work * (p - r) - (cum[hi] - cum[lo])).abs().argmin())])
        runs.append(_merged([(lo, lo + h), (hi - local + h, hi)]))
        lo, hi = lo + h, hi - local + h
    return runs + [[(lo, hi)]]


def _placed_runs(edges: list[int], cum: list[int], p: int, grain: int, split_from: float
                 ) -> list[list[tuple[int, int]]]:
    """Per rank, its merged runs: every stretch between ``edges`` of at least 2P grains whose work
    (``cum``: prefix sums of the per-position work, [S + 1]) is at least ``split_from`` split
    head-tail, the rest placed by work (see ``Layout.balanced``)."""
    local = edges[-1] // p

    runs: list[list[tuple[int, int]]] = [[] for _ in range(p)]
    load = [0] * p
    room = [local] * p
    items: list[tuple[int, int]] = []  # left over: short stretches whole, the middles of long ones
    for start, stop in zip(edges, edges[1:]):
        units = (stop - start) // grain
        if units < 2 * p or cum[stop] - cum[start] < split_from:
            items.append((start, stop))
            continue
        # Head-tail: rank r's head and tail pieces get `base` grains each; the grains left over go
        # in pairs (one on each side) to the ranks with the most room; less than 2 grains remain.
        base, extra = divmod(units, 2 * p)
        width = [base] * p
        for r in sorted(range(p), key=lambda r: (-room[r], load[r], r))[:extra // 2]:
            if room[r] >= 2 * (base + 1) * grain:
                width[r] += 1
        head, tail = start, stop
        for r in range(p):
            w = width[r] * grain
            for a in (head, tail - w):
                runs[r].append((a, a + w))
                load[r] += cum[a + w] - cum[a]
            room[r] -= 2 * w
            head, tail = head + w, tail - w
        if tail > head:
            items.append((head, tail))

    # Heaviest item first, to the least-loaded rank with room for all of it (a rank already holding
    # a neighbouring run is preferred when within `slack` of that load: fewer segments); when no
    # rank has room, the rank with the most room takes what fits and the rest goes back.
    # Items heavier than `piece` are cut into runs of whole grains of about that weight first.
    piece, slack = PIECE_SHARE * cum[-1] / p, SLACK_SHARE * cum[-1] / p
    chunks = []
    for a, b in items:
        heavy = cum[b] - cum[a]
        step = (b - a) if heavy <= piece else max(grain, int((b - a) * piece / heavy) // grain * grain)
        chunks.extend((c, min(c + step, b)) for c in range(a, b, step))
    owner_of_end = {b: r for r in range(p) for _, b in runs[r]}
    owner_of_start = {a: r for r in range(p) for a, _ in runs[r]}
    queue = [(-(cum[b] - cum[a]), a, b) for a, b in chunks]
    heapq.heapify(queue)
    left_work, left_tokens = sum(cum[b] - cum[a] for a, b in chunks), sum(b - a for a, b in chunks)
    while queue:
        _, a, b = heapq.heappop(queue)
        fits = [r for r in range(p) if room[r] >= b - a]
        if fits:
            # A rank's expected final work: what it has, plus its room at the average work left.
            rate = left_work / max(left_tokens, 1)
            final = {r: load[r] + room[r] * rate for r in fits}
            least = min(final.values())
            near = [r for r in fits if final[r] <= least + slack
                    and r in (owner_of_end.get(a), owner_of_start.get(b))]
            r = min(near or fits, key=lambda r: (final[r], r))
        else:
            r = max(range(p), key=lambda r: (room[r], -r))
            heapq.heappush(queue, (-(cum[b] - cum[a + room[r]]), a + room[r], b))
            b = a + room[r]
        runs[r].append((a, b))
        owner_of_end[b], owner_of_start[a] = r, r
        load[r] += cum[b] - cum[a]
        room[r] -= b - a
        left_work -= cum[b] - cum[a]
        left_tokens -= b - a
    return [_merged(sorted(r)) for r in runs]


def _is_layer_mix(masks) -> bool:
    return len(masks) > 0 and all(isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], (MaskSpec, FlexMask))
                                  and isinstance(m[1], int) and not isinstance(m[1], bool) and m[1] > 0
                                  for m in masks)


def _merged(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in runs:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        elif b > a:
            out.append((a, b))
    return out
