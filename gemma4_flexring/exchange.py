"""The exchange schedule: which rows of whose K/V chunk travel where at each ring step.

At ring step ``s`` rank ``r`` attends to the chunk of owner ``(r - s) mod P`` and the owner
sends it, directly, exactly the rows ``r``'s tiles read (``PairPlan.kv_rows``), possibly none;
rows never pass through a rank that does not need them. In the same step ``r`` sends its own
rows to ``(r + s) mod P``, the rank that reads its chunk at that step. The backward sends the
same rows again, and the dK/dV of the rows a rank received go back to their owner.

Every rank derives both sides from global metadata: what it receives from its own plans, what it
sends from ``schedule.needed_kv_rows`` of every other query rank against itself, the same runs
the receiver's plan holds. A step with nothing to send and nothing to receive posts nothing.

Received rows are packed: the visiting chunk is [B, Hkv, n, D] for the n rows received, and each
step's tiles have their ``kv_rows`` moved into that packed chunk.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from .schedule import PairPlan, Rows, Tile, ring_owner


class Step(NamedTuple):
    """One rank's traffic at one ring step (group ranks; rows in the owner's local rows).

    Attributes:
        send_to: the rank that reads this rank's chunk at this step.
        send_rows: the rows of this rank's chunk it reads (sent to it).
        recv_from: the owner of the chunk this rank reads at this step.
        recv_rows: the owner's rows this rank reads (received, in this order, packed).
        tiles: this rank's tiles against that chunk, ``kv_rows`` in the packed received rows
            (at step 0, the local chunk: tiles as planned).
    """

    send_to: int
    send_rows: Rows
    recv_from: int
    recv_rows: Rows
    tiles: tuple[Tile, ...]


class Exchange(NamedTuple):
    """Every ring step of one rank, step 0 (the local chunk, no traffic) first."""

    steps: tuple[Step, ...]

    def max_recv_rows(self) -> int:
        return max((row_count(s.recv_rows) for s in self.steps), default=0)

    def max_send_rows(self) -> int:
        return max((row_count(s.send_rows) for s in self.steps), default=0)

    def rows_sent(self) -> int:
        """K/V rows this rank sends in one forward (the backward sends them again, and receives
        as many dK/dV rows as it sent K/V rows)."""
        return sum(row_count(s.send_rows) for s in self.steps)


def row_count(rows: Rows) -> int:
    return sum(stop - start for start, stop in rows)


def build_exchange(rank: int, world_size: int, plans: Sequence[PairPlan], send_rows: Sequence[Rows]) -> Exchange:
    """The exchange of ``rank``.

    Args:
        plans: ``rank``'s plan against every owner (indexed by owner).
        send_rows: per query rank, the rows of ``rank``'s chunk that its plan reads
            (``needed_kv_rows(..., q_rank=d, kv_rank=rank)``; entry ``rank`` is not read).
    """
    steps = [Step(rank, (), rank, (), tuple(plans[rank].tiles))]
    for step in range(1, world_size):
        owner, reader = ring_owner(rank, step, world_size), (rank + step) % world_size
        plan = plans[owner]
        steps.append(Step(reader, tuple(send_rows[reader]), owner, plan.kv_rows, packed_tiles(plan.tiles, plan.kv_rows)))
    return Exchange(tuple(steps))


def whole_chunks(rank: int, world_size: int, plans: Sequence[PairPlan], chunk_len: int) -> Exchange:
    """An exchange that sends every chunk whole to every rank: correct for any plans, without
    knowing what other ranks need (the exchange ``ring_forward`` uses when given none)."""
    everything = ((0, chunk_len),)
    steps = [Step(rank, (), rank, (), tuple(plans[rank].tiles))]
    for step in range(1, world_size):
        owner = ring_owner(rank, step, world_size)
        steps.append(Step((rank + step) % world_size, everything, owner, everything, tuple(plans[owner].tiles)))
    return Exchange(tuple(steps))


def packed_tiles(tiles: Sequence[Tile], rows: Rows) -> tuple[Tile, ...]:
    """``tiles`` with ``kv_rows`` moved from the owner's local rows into the packed ``rows``.

    Raises:
        AssertionError: a tile reads a row outside ``rows`` (the planner broke its contract).
    """
    offsets, at = [], 0
    for start, stop in rows:
        offsets.append(at - start)
        at += stop - start
    moved = []
    for tile in tiles:
        cols = tile.kv_rows
        shift = next((off for (start, stop), off in zip(rows, offsets) if start <= cols.start and cols.stop <= stop),
                     None)
        assert shift is not None, f"tile reads rows {cols} outside the exchanged rows {rows}"
        moved.append(tile._replace(kv_rows=slice(cols.start + shift, cols.stop + shift)))
    return tuple(moved)
