"""The file store where locally spawned ranks meet (every gloo test, the demo and the bench use it)."""

from __future__ import annotations

import os
from urllib.parse import urlparse

from gemma4_flexring.testing.launch import local_init_method


def test_each_rendezvous_has_its_own_directory_removed_at_the_end():
    with local_init_method() as first, local_init_method() as second:
        paths = [urlparse(url).path for url in (first, second)]
        assert all(url.startswith("file://") for url in (first, second))
        assert paths[0] != paths[1] and all(os.path.isdir(os.path.dirname(p)) for p in paths)
        assert not any(os.path.exists(p) for p in paths)  # the store's file is created by the ranks
    assert not any(os.path.exists(os.path.dirname(p)) for p in paths)
