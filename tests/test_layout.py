"""Sharding layouts."""

from __future__ import annotations

import pytest
import torch

from gemma4_flexring import Layout


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_unshard_round_trip_and_positions(kind, world_size):
    layout = Layout(kind, world_size)
    seq_len = 24
    x = torch.arange(2 * seq_len).view(2, seq_len) * 10
    parts = [layout.shard(x, dim=1, rank=r) for r in range(world_size)]
    assert torch.equal(layout.unshard(parts, dim=1), x)
    positions = [layout.positions(seq_len, r) for r in range(world_size)]
    for r in range(world_size):
        assert torch.equal(parts[r], x[:, positions[r]])
    assert sorted(torch.cat(positions).tolist()) == list(range(seq_len))


def test_zigzag_pieces():
    layout = Layout("zigzag", 2)
    assert layout.positions(8, 0).tolist() == [0, 1, 6, 7]
    assert layout.positions(8, 1).tolist() == [2, 3, 4, 5]
    assert Layout("contiguous", 2).positions(8, 1).tolist() == [4, 5, 6, 7]


def test_bad_layouts_raise():
    with pytest.raises(ValueError, match="multiple of 8"):
        Layout("zigzag", 4).shard(torch.zeros(1, 12), dim=1, rank=0)
    with pytest.raises(ValueError, match="multiple of 3"):
        Layout("contiguous", 3).positions(10, 0)
    with pytest.raises(ValueError, match="kind"):
        Layout("ring", 2)
    with pytest.raises(ValueError, match="world_size"):
        Layout("zigzag", 0)
    with pytest.raises(ValueError, match="rank 2"):
        Layout("zigzag", 2).positions(8, 2)
    with pytest.raises(ValueError, match="2 parts"):
        Layout("zigzag", 2).unshard([torch.zeros(4)], dim=0)
