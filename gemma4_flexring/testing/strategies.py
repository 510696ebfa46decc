"""Hypothesis strategies for random sequence metadata and plans (hypothesis is a test-only
dependency: this is the one module of the package that imports it)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from .. import Layout, MaskSpec, SequenceInfo


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


@st.composite
def random_plans(draw):
    """A random mask on random (unsorted) metadata, layout (a balanced one built from the metadata
    included) and block size."""
    world_size, kind = draw(st.integers(1, 4)), draw(st.sampled_from(["contiguous", "zigzag", "balanced"]))
    pieces = world_size * (2 if kind == "zigzag" else 1)
    batch, seq_len = draw(st.integers(1, 2)), pieces * draw(st.integers(1, 48 // pieces))
    spec = MaskSpec(causal=draw(st.booleans()), sliding_window=draw(st.none() | st.integers(1, seq_len)),
                    block_bidirectional=draw(st.booleans()))
    info = SequenceInfo(draw(st.none() | runs(batch, seq_len, st.integers(0, 3))),
                        draw(st.none() | runs(batch, seq_len, st.integers(-1, 2))),
                        draw(st.none() | runs(batch, seq_len, st.integers(0, 1)).map(lambda t: t.bool())),
                        shape=(batch, seq_len))
    layout = Layout.balanced(info, world_size) if kind == "balanced" else Layout(kind, world_size)
    return spec, info, batch, seq_len, layout, draw(st.integers(1, 12))
