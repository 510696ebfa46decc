"""Hypothesis strategies for random sequence metadata."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def runs(draw, batch: int, seq_len: int, values: st.SearchStrategy) -> torch.Tensor:
    """[batch, seq_len] int64 made of runs of random (repeatable, unsorted) values."""
    rows = []
    for _ in range(batch):
        row: list[int] = []
        while len(row) < seq_len:
            row += [draw(values)] * draw(st.integers(1, seq_len))
        rows.append(row[:seq_len])
    return torch.tensor(rows, dtype=torch.long)
