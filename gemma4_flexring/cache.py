"""Block-mask plans cached per ``SequenceInfo`` generation.

Within one generation every layer, forward and backward, asks for the same pair plans; each
distinct key is built once. A request under another generation drops every entry first, so a
plan built from an older batch's metadata is never reused (keys never involve data pointers).
Calls without metadata share generation 0 for good; there, at most ``MAX_ENTRIES`` plans are
kept, the least recently used going first, so changing lengths cannot grow the cache forever.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, NamedTuple, TypeVar

T = TypeVar("T")

MAX_ENTRIES = 256


class MaskCacheInfo(NamedTuple):
    generation: int
    builds: int
    hits: int
    entries: int


class GenerationCache:
    """A dict that empties itself whenever the generation changes."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._generation = -1
        self._entries: OrderedDict[Hashable, object] = OrderedDict()
        self._builds = 0
        self._hits = 0

    def get(self, generation: int, key: Hashable, build: Callable[[], T]) -> T:
        if generation != self._generation:
            self._generation = generation
            self._entries.clear()
        if key in self._entries:
            self._hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]  # type: ignore[return-value]
        value = build()
        self._builds += 1
        self._entries[key] = value
        if len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)
        return value

    def info(self) -> MaskCacheInfo:
        return MaskCacheInfo(self._generation, self._builds, self._hits, len(self._entries))


MASK_CACHE = GenerationCache()


def mask_cache_info() -> MaskCacheInfo:
    """Counters of the block-mask cache: current generation, builds, hits, live entries."""
    return MASK_CACHE.info()


def clear_mask_cache() -> None:
    """Drop every cached plan and reset the counters."""
    MASK_CACHE.clear()
