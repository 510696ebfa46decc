"""Process-wide counters of ring work, for reports (the demo) and benchmarks.

The ring reports here as it runs: every point-to-point send and every ring step, forward and
backward, with whether the step's pair plan needed any kernel call. The counters live in the
op's eager body, so they count compiled calls too. Read them with ``ring_stats()``; they only
grow until ``reset_ring_stats()``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class RingStats:
    """Counters of this process since the last reset.

    Attributes:
        bytes_sent: bytes sent to the next rank (K/V chunks, and dK/dV in the backward).
        steps: ring steps run, one per (call, step), forward and backward.
        steps_skipped: steps whose pair plan had no tile: the visiting chunk holds no key any
            local query may see, so no kernel ran (the chunk still moves on).
        agreements: cross-rank agreements held before a first exchange (one small all_gather
            each, a host synchronisation on GPUs): one per batch and kind of layer call.
    """

    bytes_sent: int = 0
    steps: int = 0
    steps_skipped: int = 0
    agreements: int = 0


_STATS = RingStats()


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


def ring_stats() -> RingStats:
    """A snapshot of the counters."""
    return dataclasses.replace(_STATS)


def reset_ring_stats() -> None:
    """Set every counter back to zero."""
    for field in dataclasses.fields(RingStats):
        setattr(_STATS, field.name, 0)
