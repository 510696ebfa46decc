"""Row runs: which rows of a rank's chunk a plan reads, as sorted, disjoint [start, stop) runs.

Shape legend: R rows of a flag table, C its columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..layout import Segment

Rows = tuple[tuple[int, int], ...]  # sorted, disjoint [start, stop) runs of a rank's local rows


def merge_rows(rows) -> Rows:
    """Sorted, disjoint runs covering the union of [start, stop) runs ``rows``."""
    merged: list[list[int]] = []
    for start, stop in sorted(rows):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return tuple((a, b) for a, b in merged)


def runs(kind: Tensor) -> Tensor:
    """Maximal [start, stop) stretches of equal nonzero values in each row of ``kind`` [R, C]:
    int64 [runs, 4] rows of (row, start, stop, value), by row then start."""
    padded = torch.nn.functional.pad(kind, (1, 1))
    rows, edges = (padded[:, 1:] != padded[:, :-1]).nonzero(as_tuple=True)  # a value starts at each edge
    values = padded[rows, edges + 1].long()
    stops = edges.roll(-1)  # a nonzero stretch always ends at the row's next edge
    keep = values != 0
    return torch.stack([rows[keep], edges[keep], stops[keep], values[keep]], 1)


def block_elements(segment: Segment, b0: int, b1: int, block_size: int) -> tuple[int, int]:
    """[start, stop) of ``segment``'s elements that its blocks [b0, b1) hold (the last may be short)."""
    return b0 * block_size, min(b1 * block_size, segment.length)


def segment_rows(segment: Segment, start: int, stop: int) -> slice:
    """Local rows of ``segment``'s elements [start, stop)."""
    return slice(segment.local_start + start, segment.local_start + stop)


def seen_key_rows(seen_keys: Tensor, ks: Segment) -> list[tuple[int, int]]:
    """Local rows of segment ``ks`` that some query may see, as runs; ``seen_keys`` [ks.length]
    are ``segment_flags``' seen keys."""
    if seen_keys.all():
        return [(ks.local_start, ks.local_start + ks.length)]
    return [(ks.local_start + a, ks.local_start + b) for _, a, b, _ in runs(seen_keys.view(1, -1).to(torch.int8)).tolist()]
