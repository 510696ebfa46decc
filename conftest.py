import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))

from cluster import Cluster  # noqa: E402

_clusters: dict[int, Cluster] = {}


@pytest.fixture(scope="session")
def cluster():
    """``cluster(world_size)``: a shared gloo Cluster of that size (spawned on first use)."""

    def get(world_size: int) -> Cluster:
        if world_size not in _clusters:
            _clusters[world_size] = Cluster(world_size)
        return _clusters[world_size]

    yield get
    for c in _clusters.values():
        c.close()
    _clusters.clear()
