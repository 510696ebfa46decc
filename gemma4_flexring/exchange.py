"""The exchange schedule: which rows of whose K/V chunk travel where at each ring step.

At ring step ``s`` rank ``r`` attends to the chunk of owner ``(r - s) mod P`` and the owner
sends it, directly, exactly the rows ``r``'s kernel calls read, possibly none: the rows of its
``CallPlan`` (the kernel's view of the pair plan: exact rows for aten's tiles, whole key blocks for
flex's segment pairs). Rows never pass through a rank that
does not need them. In the same step ``r`` sends its own rows to ``(r + s) mod P``, the rank that
reads its chunk at that step. The backward sends the same rows again, and the dK/dV of the rows
a rank received go back to their owner.

Every rank derives both sides from global metadata: what it receives from its own plans, what it
sends from ``planning.plan.needed_kv_rows`` of every other query rank against itself, the same runs
the receiver's plan holds. A step with nothing to send and nothing to receive posts nothing.

Received rows are packed: the visiting chunk is [B, Hkv, n, D] for the n rows received, and each
step's calls (tiles or segment pairs) have their ``kv_rows`` moved into that packed chunk.

Pieces bound memory. A step's rows are cut into pieces of at most ``piece_rows`` rows, and
its tiles at the pieces' edges and every ``piece_rows`` query rows (``planning.tiles.split_tile``):
no kernel call reads more, and the backward computes and sends home each piece's dK/dV on its
own. Reader and owner cut the same row count the same way (``piece_bounds``), so the owner
knows which of its rows each piece of dK/dV coming home holds; rows that travel are cut into
pieces of equal count where their size allows, so that ranks keep pace in the backward.

Calls of the local chunk that are *alone* are not cut: each is the only contributor to its query
rows and to its key rows (no other call reads them, no rank reads those keys), so its results are
final and nothing is summed (``split_alone``). They form a piece of their own (``Piece.alone``),
first in step 0: the ring computes them in the inputs' dtype (a bfloat16 backward without the
float32 round trip that sums need) and writes their results instead of merging or adding them.
At P=1 a causal or unmasked layer is one such call, as on one device.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from .planning import context
from .planning.plan import CallPlan
from .planning.rows import Rows
from .planning.tiles import split_tile

def ring_owner(rank: int, step: int, world_size: int) -> int:
    """Rank whose key/value chunk ``rank`` holds at ring ``step``."""
    return (rank - step) % world_size


PIECES_PER_CHUNK = 8  # a whole chunk's rows travel and are computed in this many pieces...
# ...of at least this many rows. Measured with the aten CPU kernel at P=1 (S=4096 and 16384):
# float32 calls of 512 rows run as fast as uncut ones; bfloat16 ones below 2048 rows do not (the
# kernel repacks K/V for each call: 512-row pieces took 1.6x the uncut step, 2048-row ones 0.97x).
MIN_PIECE_ROWS = 512
MIN_HALF_PIECE_ROWS = 2048  # float16, bfloat16


def piece_rows(chunk_len: int, dtype: torch.dtype) -> int:
    """The most key rows (and query rows) one kernel call, and one piece of dK/dV, may hold for
    chunks of ``chunk_len`` rows of ``dtype``: an eighth of the chunk in whole blocks, at least
    ``MIN_PIECE_ROWS`` (``MIN_HALF_PIECE_ROWS`` in half precision)."""
    block = context.BLOCK_SIZE
    fewest = MIN_HALF_PIECE_ROWS if dtype in (torch.float16, torch.bfloat16) else MIN_PIECE_ROWS
    return max(fewest, -(-chunk_len // (PIECES_PER_CHUNK * block)) * block)


def piece_bounds(rows: int, most: int | None, pace: int = 0) -> tuple[tuple[int, int], ...]:
    """``rows`` cut into near-equal [start, stop) pieces of at most ``most`` rows (one piece when
    ``most`` is None); none when ``rows`` is 0: the fewest such pieces, but at least ``pace``
    (rows that travel: a whole chunk's piece count) as long as each keeps half of ``most`` rows.

    Pacing: in the backward a rank sends piece n's dK/dV away in one batch with piece n coming
    home, and reuses that slot two pieces later (``ring._PieceGrads``), so ranks go through their
    pieces in step with their peers. Cut by size alone, a rank that reads fewer of a peer's rows
    than the peer reads of its own gets fewer, heavier pieces, and both wait on each other: at
    P=2, S=32768, causal zigzag (one rank reads 16384 rows of the other, which reads 8192 back:
    8 pieces against 4), the backward waited 15-18% of its time on both ranks. Paced, both cut 8
    pieces of equal work and the wait fell to 0-4%. Any exchange of at least half a chunk gets a
    whole chunk's count.
    """
    if most is None:
        count = 1
    else:
        count = max(math.ceil(rows / most), min(pace, math.ceil(rows / max(1, most // 2))))
    cuts = [i * rows // count for i in range(count + 1)] if rows else []
    return tuple(zip(cuts, cuts[1:]))


def sub_rows(rows: Rows, start: int, stop: int) -> Rows:
    """The runs of ``rows`` that packed rows [start, stop) hold (``rows`` packed one after another)."""
    out, at = [], 0
    for a, b in rows:
        lo, hi = max(start, at), min(stop, at + b - a)
        if lo < hi:
            out.append((a + lo - at, a + hi - at))
        at += b - a
    return tuple(out)


class Piece(NamedTuple):
    """Rows [start, stop) of a step's visiting chunk (packed) and the calls that read only them;
    the backward computes and sends home their dK/dV together. ``alone``: every call of the piece
    is the only contributor to its query rows and key rows (``split_alone``; local chunk only)."""

    start: int
    stop: int
    calls: tuple
    alone: bool = False


class Step(NamedTuple):
    """One rank's traffic at one ring step (group ranks; rows in the owner's local rows).

    Attributes:
        send_to: the rank that reads this rank's chunk at this step.
        send_rows: the rows of this rank's chunk it reads (sent to it).
        recv_from: the owner of the chunk this rank reads at this step.
        recv_rows: the owner's rows this rank reads (received, in this order, packed).
        pieces: this rank's calls against that chunk, by piece of the packed received rows
            (at step 0, the local chunk's rows).
        home: per piece of ``send_rows`` (cut as ``send_to`` cuts its received rows), this rank's
            rows whose dK/dV that piece brings home in the backward.
    """

    send_to: int
    send_rows: Rows
    recv_from: int
    recv_rows: Rows
    pieces: tuple[Piece, ...]
    home: tuple[Rows, ...] = ()

    @property
    def calls(self) -> tuple:
        return tuple(c for p in self.pieces for c in p.calls)


class Exchange(NamedTuple):
    """Every ring step of one rank, step 0 (the local chunk, no traffic) first."""

    steps: tuple[Step, ...]

    def max_recv_rows(self) -> int:
        return max((row_count(s.recv_rows) for s in self.steps), default=0)

    @property
    def lone(self) -> bool:
        """Whether no output row sums two shares: nothing travels, and every call is alone (P=1
        causal or unmasked, or ranks that read nothing of each other). Outputs then need no
        wider accumulator than the inputs' dtype."""
        first, *rest = self.steps
        return all(p.alone for p in first.pieces) and not any(s.send_rows or s.recv_rows for s in rest)

    def whole_call(self, rows: int):
        """The one call of a lone exchange when it reads every query row and key row of the chunk
        ([0, rows) on both sides; P=1 causal or unmasked): all the work there is; else None."""
        pieces = self.steps[0].pieces
        if not (self.lone and len(pieces) == 1 and len(pieces[0].calls) == 1):
            return None
        call = pieces[0].calls[0]
        return call if call.q_rows == call.kv_rows == slice(0, rows) else None

    def max_piece_rows(self, home: bool) -> int:
        """The most rows of one piece of dK/dV sent away (or, ``home``, coming home)."""
        sizes = [row_count(h) for s in self.steps for h in s.home] if home else \
            [p.stop - p.start for s in self.steps[1:] for p in s.pieces]
        return max(sizes, default=0)


def row_count(rows: Rows) -> int:
    return sum(stop - start for start, stop in rows)


def build_exchange(rank: int, world_size: int, plans: Sequence[CallPlan], send_rows: Sequence[Rows],
                   chunk_len: int, most_rows: int | None = None) -> Exchange:
    """The exchange of ``rank``, whose chunk holds ``chunk_len`` rows.

    Args:
        plans: ``rank``'s plan against every owner as its kernel runs them (indexed by owner).
        send_rows: per query rank, the rows of ``rank``'s chunk that its plan reads
            (``needed_kv_rows(ctx, d, rank)``; entry ``rank`` is not read).
        most_rows: the pieces' size (``piece_rows``); None: one piece per step, tiles uncut.
    """
    others = [c for owner, plan in enumerate(plans) if owner != rank for c in plan.calls]
    read_elsewhere = [run for reader, rows in enumerate(send_rows) if reader != rank for run in rows]
    alone, shared = split_alone(plans[rank].calls, others, read_elsewhere, chunk_len)
    pieces = ((Piece(0, chunk_len, alone, True),) if alone else ()) + \
        (cut_pieces(shared, chunk_len, most_rows) if shared else ())
    steps = [Step(rank, (), rank, (), pieces)]
    pace = len(piece_bounds(chunk_len, most_rows))  # every rank's chunks have chunk_len rows: all agree
    for step in range(1, world_size):
        owner, reader = ring_owner(rank, step, world_size), (rank + step) % world_size
        plan, sent = plans[owner], tuple(send_rows[reader])
        home = tuple(sub_rows(sent, a, b) for a, b in piece_bounds(row_count(sent), most_rows, pace))
        calls = packed_calls(plan.calls, plan.kv_rows)
        steps.append(Step(reader, sent, owner, plan.kv_rows,
                          cut_pieces(calls, row_count(plan.kv_rows), most_rows, pace), home))
    return Exchange(tuple(steps))


def split_alone(calls: Sequence, others: Sequence, sent: Rows, rows: int) -> tuple[tuple, tuple]:
    """``calls`` of the local chunk (rows [0, rows) on both sides) as (alone, shared): a call is
    alone when no other call, of any step (``others``), reads one of its query rows, no other
    local call reads one of its key rows, and no rank reads one (``sent``: the runs of local rows
    sent to any rank, whose dK/dV come home to be added)."""
    q_shared = _shared_prefix([_span(c.q_rows) for c in (*calls, *others)], rows)
    k_shared = _shared_prefix([*(_span(c.kv_rows) for c in calls), *sent], rows)

    def is_alone(call) -> bool:
        return (q_shared[call.q_rows.stop] == q_shared[call.q_rows.start]
                and k_shared[call.kv_rows.stop] == k_shared[call.kv_rows.start])

    alone = tuple(c for c in calls if is_alone(c))
    return alone, tuple(c for c in calls if not is_alone(c))


def _span(rows: slice) -> tuple[int, int]:
    return rows.start, rows.stop


def _shared_prefix(spans: Sequence[tuple[int, int]], rows: int) -> list[int]:
    """Prefix counts (``rows + 1`` of them) of the rows [0, rows) that lie in two or more of the
    [start, stop) ``spans``: rows [a, b) hold such a row iff entry b exceeds entry a."""
    edges = torch.zeros(rows + 1, dtype=torch.int64)
    if spans:
        starts, stops = torch.tensor(spans, dtype=torch.int64).T
        edges.index_add_(0, starts, torch.ones_like(starts)).index_add_(0, stops, -torch.ones_like(stops))
    twice = edges.cumsum(0)[:-1] > 1
    return [0, *twice.cumsum(0).tolist()]


def cut_pieces(calls: Sequence, rows: int, most_rows: int | None, pace: int = 0) -> tuple[Piece, ...]:
    """``calls`` reading rows [0, rows) of a visiting chunk, cut into the pieces of ``piece_bounds``
    and, when they are tiles, into at most ``most_rows`` query rows (``split_tile``); None: one
    piece, uncut (the flex kernel's calls).
    ``pace``: see ``piece_bounds`` (rows that travel are cut as their owner cuts their dK/dV)."""
    bounds = piece_bounds(rows, most_rows, pace)
    if most_rows is None:
        return tuple(Piece(a, b, tuple(calls)) for a, b in bounds)
    kv_cuts = [a for a, _ in bounds[1:]]
    parts = [split_tile(t, range(t.q_rows.start + most_rows, t.q_rows.stop, most_rows), kv_cuts) for t in calls]
    return tuple(Piece(a, b, tuple(p for ps in parts for p in ps if a <= p.kv_rows.start < b)) for a, b in bounds)


def packed_calls(calls: Sequence, rows: Rows) -> tuple:
    """``calls`` (tiles or segment pairs) with ``kv_rows`` moved from the owner's local rows into
    the packed ``rows``.

    Raises:
        AssertionError: a call reads a row outside ``rows`` (the planner broke its contract).
    """
    offsets, at = [], 0
    for start, stop in rows:
        offsets.append(at - start)
        at += stop - start
    moved = []
    for call in calls:
        cols = call.kv_rows
        shift = next((off for (start, stop), off in zip(rows, offsets) if start <= cols.start and cols.stop <= stop),
                     None)
        assert shift is not None, f"call reads rows {cols} outside the exchanged rows {rows}"
        moved.append(call._replace(kv_rows=slice(cols.start + shift, cols.stop + shift)))
    return tuple(moved)
