"""The launcher every gloo test, the demo, the bench and selfcheck start their ranks with: where
the ranks meet, what comes back from them, and how their failures surface."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import pytest
import torch
import torch.distributed as dist

from gemma4_flexring.testing import launch
from gemma4_flexring.testing.launch import WorkerError, local_init_method, spawn


def test_each_rendezvous_has_its_own_directory_removed_at_the_end():
    with local_init_method() as first, local_init_method() as second:
        paths = [urlparse(url).path for url in (first, second)]
        assert all(url.startswith("file://") for url in (first, second))
        assert paths[0] != paths[1] and all(os.path.isdir(os.path.dirname(p)) for p in paths)
        assert not any(os.path.exists(p) for p in paths)  # the store's file is created by the ranks
    assert not any(os.path.exists(os.path.dirname(p)) for p in paths)


def _rank_sum(rank: int, world_size: int, offset: int) -> tuple[int, torch.Tensor, str]:
    t = torch.tensor([rank + offset])
    dist.all_reduce(t)
    return rank, t, os.environ.get("GEMMA4_FLEXRING_TEST_ENV", "")


def _no_group(rank: int, world_size: int) -> bool:
    return dist.is_initialized()


def _raise_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise KeyError("no such thing")
    dist.recv(torch.zeros(1), src=1)  # waits on rank 1, which never sends


def _exit_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(3)
    return rank


def test_spawn_returns_each_ranks_result_in_rank_order():
    """Ranks join one gloo group, start with the environment given, and send tensors back."""
    results = spawn(_rank_sum, 3, 10, env={"GEMMA4_FLEXRING_TEST_ENV": "set"})
    assert [(r, int(t), e) for r, t, e in results] == [(r, 33, "set") for r in range(3)]
    assert "GEMMA4_FLEXRING_TEST_ENV" not in os.environ
    assert spawn(_no_group, 1, join_group=False) == [False]


def test_an_error_on_one_rank_surfaces_with_its_type_and_message_and_stops_its_waiting_peer(monkeypatch):
    """Rank 1 raises; rank 0 waits on it (as a peer of a failed rank waits for the group's timeout):
    after the grace period it is stopped, and the error names both."""
    monkeypatch.setattr(launch, "PEER_GRACE_S", 1)
    with pytest.raises(WorkerError) as failure:
        spawn(_raise_on_rank_one, 2)
    message = str(failure.value)
    assert "rank 1: KeyError: 'no such thing'" in message and "Traceback" in message
    assert "rank 0: still running 1 s after a peer failed" in message


def test_a_rank_that_dies_is_reported_with_its_exit_code():
    with pytest.raises(WorkerError, match=r"rank 1: the process died \(exit code 3\)"):
        spawn(_exit_on_rank_one, 2)


def test_a_cluster_serves_calls_until_a_rank_is_lost():
    """Calls reuse the ranks; a call that loses a rank reports it and closes the cluster."""
    cluster = launch.Cluster(2)
    try:
        for _ in range(2):
            assert [int(t) for _, t, _ in cluster.run(_rank_sum, 0)] == [1, 1]
        assert cluster.errors(_exit_on_rank_one) == [("", ""), ("", "the process died (exit code 3)")]
        assert cluster.closed
        with pytest.raises(WorkerError, match="closed"):
            cluster.run(_rank_sum, 0)
    finally:
        cluster.close()
