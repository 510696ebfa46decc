"""The generation cache: one generation at a time, bounded, least recently used evicted first."""

from __future__ import annotations

from gemma4_flexring import cache


def test_a_new_generation_drops_the_old_entries():
    c = cache.GenerationCache()
    assert c.get(1, "a", lambda: 1) == 1 and c.get(1, "a", lambda: 2) == 1
    assert c.get(2, "a", lambda: 3) == 3
    assert c.info() == cache.MaskCacheInfo(generation=2, builds=2, hits=1, entries=1)


def test_entries_are_bounded_least_recently_used_first(monkeypatch):
    monkeypatch.setattr(cache, "MAX_ENTRIES", 3)
    c = cache.GenerationCache()
    for key in "abc":
        c.get(0, key, lambda: key)
    c.get(0, "a", lambda: "rebuilt")  # a is now the most recent
    c.get(0, "d", lambda: "d")        # evicts b
    assert c.info().entries == 3
    assert c.get(0, "b", lambda: "rebuilt b") == "rebuilt b"
    assert c.get(0, "a", lambda: "rebuilt") == "a"
