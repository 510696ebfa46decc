"""Ring counters: bytes sent and steps skipped, against what the schedule implies."""

from __future__ import annotations

import pytest

from gemma4_flexring.testing.workers import agreements_over_layers, causal_step_stats

CHUNK_BYTES = 2 * 1 * 2 * 8 * 8 * 4  # K and V, [B=1, Hkv=2, L=8, D=8], float32


@pytest.mark.parametrize("world_size", [1, 3])
def test_causal_contiguous_counters(cluster, world_size):
    per_rank = [causal_step_stats(0, 1)] if world_size == 1 else cluster(world_size).run(causal_step_stats)
    for rank, stats in enumerate(per_rank):
        # Rank r's chunk goes only to the later ranks, whose queries see it, forward and backward;
        # the dK/dV of the r earlier ranks' chunks go home to them (float32, the inputs' dtype).
        sends = 2 * (world_size - 1 - rank) + rank
        assert stats.bytes_sent == sends * CHUNK_BYTES
        assert stats.steps == 2 * world_size
        # Chunks of later ranks hold only future keys: skipped in forward and backward.
        assert stats.steps_skipped == 2 * (world_size - 1 - rank)


def test_ranks_agree_once_per_batch_and_kind_of_layer(cluster):
    """Three layer calls with two masks: two agreements (all_gathers) per batch, not three."""
    assert cluster(2).run(agreements_over_layers) == [[2, 2], [2, 2]]
