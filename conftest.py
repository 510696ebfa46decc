import pytest

from gemma4_flexring.testing.launch import Cluster

# A call that gets no answer from a rank for this long is a hung collective: its cluster is stopped
# and the test fails (no test measures time).
HANG_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def cluster():
    """``cluster(world_size)``: a shared gloo Cluster of that size (spawned on first use, and again
    after one was stopped by a hung or failed call)."""
    clusters: dict[int, Cluster] = {}

    def get(world_size: int) -> Cluster:
        if world_size not in clusters or clusters[world_size].closed:
            clusters[world_size] = Cluster(world_size, answer_timeout_s=HANG_TIMEOUT_S)
        return clusters[world_size]

    yield get
    for c in clusters.values():
        c.close()
