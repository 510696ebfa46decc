"""Process-wide counters of ring work, for reports (the demo) and benchmarks.

The ring reports here as it runs: every point-to-point send, every ring step, forward and
backward, with whether the step's pair plan needed any kernel call, and the time spent waiting
for exchanges to complete. The counters live in the
op's eager body, so they count compiled calls too. Read them with ``ring_stats()``; they only
grow until ``reset_ring_stats()``.
"""

from __future__ import annotations

import dataclasses
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


@dataclass
class RingStats:
    """Counters of this process since the last reset.

    Attributes:
        bytes_sent: bytes sent to other ranks (K/V rows, and dK/dV of received rows in the backward).
        steps: ring steps run, one per (call, step), forward and backward.
        steps_skipped: steps whose pair plan had no tile: the owner's chunk holds no key any
            local query may see, so no kernel ran and no row of it was received.
        planning_s: seconds spent planning on the ring's path: describing metadata and building
            plans and exchange schedules (cache misses only).
        planning_ahead_s: the same work done off the path, on ``plan_ahead``'s thread.
        wait_forward_s, wait_backward_s: seconds spent waiting for exchanges to complete (time
            the exchange was not hidden behind computation), in forward and backward calls.
        agreements: cross-rank agreements held before a first exchange (one small all_gather
            each, a host synchronisation on GPUs): one per batch and kind of layer call.
    """

    bytes_sent: int = 0
    steps: int = 0
    steps_skipped: int = 0
    planning_s: float = 0.0
    planning_ahead_s: float = 0.0
    wait_forward_s: float = 0.0
    wait_backward_s: float = 0.0
    agreements: int = 0


_STATS = RingStats()
_AHEAD = threading.local()  # .active: this thread plans ahead (``planning_ahead``)


@contextmanager
def planning_ahead() -> Iterator[None]:
    """Count the planning this thread does in the block as ``planning_ahead_s``."""
    _AHEAD.active = True
    try:
        yield
    finally:
        _AHEAD.active = False


def record_send(nbytes: int) -> None:
    """Count one send of ``nbytes`` bytes."""
    _STATS.bytes_sent += nbytes


def record_agreement() -> None:
    """Count one cross-rank agreement."""
    _STATS.agreements += 1


def record_step(tiles: int) -> None:
    """Count one ring step that ran ``tiles`` kernel calls (0: skipped)."""
    _STATS.steps += 1
    _STATS.steps_skipped += tiles == 0


def record_wait(seconds: float, backward: bool) -> None:
    """Count ``seconds`` spent waiting on an exchange."""
    if backward:
        _STATS.wait_backward_s += seconds
    else:
        _STATS.wait_forward_s += seconds


def record_planning(seconds: float) -> None:
    """Count ``seconds`` spent planning (on the path, or ahead: ``planning_ahead``)."""
    if getattr(_AHEAD, "active", False):
        _STATS.planning_ahead_s += seconds
    else:
        _STATS.planning_s += seconds


def ring_stats() -> RingStats:
    """A snapshot of the counters."""
    return dataclasses.replace(_STATS)


def reset_ring_stats() -> None:
    """Set every counter back to zero."""
    for field in dataclasses.fields(RingStats):
        setattr(_STATS, field.name, field.default)
