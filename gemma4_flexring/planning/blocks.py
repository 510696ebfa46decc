"""Block-level mask classes: whether each (query block, key block) is empty, full or partial.

A class is decided from per-block summaries (position bounds, min/max of the metadata), never by
evaluating the mask entry by entry, so classifying costs O(S + Qb x KVb) instead of O(S^2).
Shape legend: B batch rows of metadata (1 when a class does not depend on the row), N blocks,
Qb query blocks, KVb key blocks. Classifiers read only ``bounds()`` and ``summary()``, so they take
``Spans`` (runs of any lengths) as well as ``Blocks``.

Classes are ordered ``EMPTY < PARTIAL < FULL``: the class of an AND of masks is the minimum of
theirs (empty if any is empty, full if all are full), the class of an OR the maximum. Every
classifier here is *sound*: a block called empty holds no allowed entry and a block called full
holds only allowed ones. PARTIAL may be conservative (documents or image ids whose ranges overlap
without matching, an AND of two partial terms); the planner evaluates those blocks densely.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import torch
from torch import Tensor

EMPTY, PARTIAL, FULL = 0, 1, 2
CLASS_DTYPE = torch.int8
SUMMARY_PIECE = 128  # positions ``Spans.summary`` reduces at once


@dataclass(frozen=True)
class Blocks:
    """Consecutive blocks over the global positions [start, start + length): block n holds
    [start + n * size, min(start + (n + 1) * size, start + length)), so only the last may be short.
    """

    start: int
    length: int
    size: int
    device: torch.device

    @property
    def count(self) -> int:
        return -(-self.length // self.size)

    def as_one(self) -> "Blocks":
        """The whole run as a single block."""
        return Blocks(self.start, self.length, self.length, self.device)

    def complete(self) -> Tensor:
        """Which blocks hold ``size`` positions (all but a short last one): bool [N]."""
        return torch.arange(self.count, device=self.device) < self.length // self.size

    def bounds(self) -> tuple[Tensor, Tensor]:
        """First and last global position of every block: int64 [N], [N]."""
        first = self.start + self.size * torch.arange(self.count, device=self.device)
        return first, (first + self.size).clamp(max=self.start + self.length) - 1

    def summary(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Min and max of whole-sequence ``x`` [B, S] over every block: int64 [B, N], [B, N]."""
        part = x[:, self.start:self.start + self.length].to(self.device, torch.int64)
        overhang = self.count * self.size - self.length
        # Repeating the last element leaves every block's min and max unchanged.
        part = torch.cat([part, part[:, -1:].expand(-1, overhang)], dim=1).view(x.shape[0], self.count, self.size)
        return part.amin(-1), part.amax(-1)


@dataclass(frozen=True, eq=False)
class Spans:
    """Runs of positions of any lengths, in any order, classified like ``Blocks``: run n holds the
    global positions [first[n], last[n]] (int64 [N] each). The segments of a layout's rank, or a
    segment cut into stretches."""

    first: Tensor
    last: Tensor

    @classmethod
    def of(cls, segments, device: torch.device) -> "Spans":
        """The runs of ``segments`` (objects with ``global_start`` and ``length``, such as a
        layout's ``Segment``), in their order."""
        first = torch.tensor([s.global_start for s in segments], dtype=torch.int64, device=device)
        return cls(first, first + torch.tensor([s.length for s in segments], dtype=torch.int64, device=device) - 1)

    @property
    def count(self) -> int:
        return self.first.numel()

    def bounds(self) -> tuple[Tensor, Tensor]:
        """First and last global position of every run: int64 [N], [N]."""
        return self.first, self.last

    def summary(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Min and max of whole-sequence ``x`` [B, S] over every run: int64 [B, N], [B, N]."""
        # Runs cut into pieces of SUMMARY_PIECE positions (a short last one padded by repeating its
        # last position), summarised piece by piece, then run by run: O(S) memory and work.
        device = self.first.device
        pieces = (self.last - self.first) // SUMMARY_PIECE + 1  # [N]
        run = torch.repeat_interleave(torch.arange(self.count, device=device), pieces)  # [pieces]
        nth = torch.arange(run.numel(), device=device) - (torch.cumsum(pieces, 0) - pieces)[run]
        starts = self.first[run] + nth * SUMMARY_PIECE
        positions = torch.minimum(starts[:, None] + torch.arange(SUMMARY_PIECE, device=device), self.last[run, None])
        part = x[:, positions.to(x.device)].to(device, torch.int64)  # [B, pieces, SUMMARY_PIECE]
        index = run.expand(part.shape[0], -1)
        out = part.new_empty(part.shape[0], self.count)
        return (out.scatter_reduce(1, index, part.amin(-1), "amin", include_self=False),
                out.scatter_reduce(1, index, part.amax(-1), "amax", include_self=False))


def classes(full: Tensor, empty: Tensor) -> Tensor:
    """Classes from two bool conditions (never both true): FULL where ``full``, EMPTY where ``empty``."""
    return PARTIAL + full.to(CLASS_DTYPE) - empty.to(CLASS_DTYPE)


def and_classes(*terms: Tensor) -> Tensor:
    """Class of the AND of masks with these classes (broadcast): their minimum."""
    return reduce(torch.minimum, terms)


def or_classes(*terms: Tensor) -> Tensor:
    """Class of the OR of masks with these classes (broadcast): their maximum."""
    return reduce(torch.maximum, terms)


def order_classes(q: Blocks, k: Blocks) -> Tensor:
    """``j <= i``: int8 [1, Qb, KVb]."""
    (q_first, q_last), (k_first, k_last) = q.bounds(), k.bounds()
    return classes(k_last[None, :] <= q_first[:, None], k_first[None, :] > q_last[:, None]).unsqueeze(0)


def window_classes(q: Blocks, k: Blocks, window: int, causal: bool) -> Tensor:
    """``j > i - W`` (causal) or ``|i - j| <= W``: int8 [1, Qb, KVb]."""
    (q_first, q_last), (k_first, k_last) = q.bounds(), k.bounds()
    q_first, q_last, k_first, k_last = q_first[:, None], q_last[:, None], k_first[None, :], k_last[None, :]
    if causal:
        full, empty = k_first > q_last - window, k_last <= q_first - window
    else:
        full = torch.maximum(q_last - k_first, k_last - q_first) <= window
        empty = (k_first - q_last > window) | (q_first - k_last > window)
    return classes(full, empty).unsqueeze(0)


def equal_classes(q: Blocks, k: Blocks, q_values: Tensor, k_values: Tensor) -> Tensor:
    """``q_values[b, i] == k_values[b, j]`` for whole-sequence [B, S] values: int8 [B, Qb, KVb].

    Full when both blocks hold one and the same value; empty when their [min, max] ranges are
    disjoint (exact for sorted values, conservative otherwise: values need not be monotonic).
    """
    q_lo, q_hi = (t[:, :, None] for t in q.summary(q_values))
    k_lo, k_hi = (t[:, None, :] for t in k.summary(k_values))
    return classes((q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo), (q_hi < k_lo) | (k_hi < q_lo))


def key_classes(k: Blocks, hidden: Tensor) -> Tensor:
    """``not hidden[b, j]`` for whole-sequence bool [B, S]: int8 [B, 1, KVb], exact."""
    lo, hi = k.summary(hidden)
    return classes(hi == 0, lo == 1).unsqueeze(1)
