"""Block-mask plans, cached per batch of metadata.

Four maps, each trimmed least recently used first:

- generation -> ``Metadata`` (digest and relevant fields), or a ``FlexMask``'s generation ->
  its ``FlexSpec`` (digest and mask_mod), with a stamp of the tensors it was computed from. A
  generation seen again with the same stamp costs no hashing; a changed stamp (an in-place
  mutation, other tensors under the same generation) is described afresh.
- digest -> the plans built for that content, one per (mask, shapes, ranks) key. Plans of the
  ``capacity`` most recently used digests are kept; interleaved micro-batches (forward A,
  forward B, backward A, backward B) thus build every plan once. Two batches with equal content
  share their plans.
- digest -> the exchange schedules derived from those plans (``exchange``), dropped with them.
- layout digest -> the ``Layout`` (segments per rank) rebuilt from the op's layout table. The
  table is hashed at every call (O(S), no data-pointer shortcut: tables are made afresh per call
  and freed memory is reused); its runs are found and checked once per content.

Every build (hashing metadata, a plan, a schedule) runs outside the cache's lock, once: a thread
planning the next batch ahead (``plan_ahead``) never holds up this batch's lookups, and a thread
that needs what another is building waits for it rather than building it again.

Memory bound: ``capacity`` x (distinct masks x world size) pair plans; each pair plan holds
additive masks over partially allowed blocks only (see ``tiles.py``), and the generation map
holds ``4 x capacity`` small entries. Plans never depend on data pointers, so a plan can only be
served for metadata with the same digest.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, Hashable, NamedTuple, TypeVar

from torch import Tensor

from ..layout import Layout
from .flexmask import FlexSpec, flex_spec
from .metadata import Metadata, content_digest, describe, stamp
from ..stats import record_planning

T = TypeVar("T")

DEFAULT_CAPACITY = 8


class MaskCacheInfo(NamedTuple):
    """Counters of the plan cache.

    Attributes:
        generation: the generation looked up last (-1 before any).
        builds: pair plans built; hits: pair plans served from the cache.
        contents: metadata contents whose plans are live; capacity: the most kept.
        entries: live pair plans.
        described: times a batch's metadata (or a FlexMask's tensors) was read and hashed.
    """

    generation: int
    builds: int
    hits: int
    contents: int
    capacity: int
    entries: int
    described: int

    @property
    def generations(self) -> int:
        """``contents`` under its former name (it counts metadata contents, not generations)."""
        return self.contents


def _locked(method):
    """Run the method under the cache's lock: the ranks of a simulated ring are threads."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class PlanCache:
    """Plans keyed by metadata digest, least recently used digests evicted first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._lock = threading.RLock()
        self.capacity = capacity
        self.clear()

    @_locked
    def clear(self) -> None:
        self._metadata: OrderedDict[Hashable, tuple[tuple | None, object]] = OrderedDict()  # ``_described``
        self._plans: OrderedDict[bytes, dict[Hashable, object]] = OrderedDict()
        self._layouts: OrderedDict[bytes, Layout] = OrderedDict()
        self._exchanges: dict[bytes, dict[Hashable, object]] = {}  # exchange schedules, per digest
        self._pending: dict[Hashable, Future] = {}  # builds under way (``_once``), by what they build
        self._generation = -1
        self._builds = self._hits = self._described_count = 0

    @_locked
    def set_capacity(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"mask cache capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self._trim()

    def metadata(self, generation: int, tensors: tuple[Tensor, Tensor, Tensor]) -> Metadata:
        """The ``Metadata`` of ``tensors`` (the batch of ``generation``), hashed once per stamp."""
        with self._lock:
            self._generation = generation
        return self._described(("metadata", generation), tensors, lambda: describe(*tensors))

    def flex(self, generation: int, op_name: str, tensors: list[Tensor]) -> FlexSpec:
        """The ``FlexSpec`` of a ``FlexMask`` (its ``op_name``, its ``tensors``, its
        ``generation``): the tensors hashed and the factory called once per stamp."""
        return self._described(("flex", generation, op_name), tuple(tensors), lambda: flex_spec(op_name, tensors))

    def _described(self, key: Hashable, tensors: tuple[Tensor, ...], build: Callable[[], T]) -> T:
        """What ``build`` makes of ``tensors`` (a generation's), made again only when their stamp
        changes (an in-place mutation, other tensors under the same generation)."""
        now = stamp(tensors)

        def lookup() -> T | None:
            known = self._metadata.get(key)
            if known is not None and now is not None and known[0] == now:
                self._metadata.move_to_end(key)
                return known[1]
            return None

        def store(value: T) -> T:
            self._described_count += 1
            self._metadata[key] = (now, value)
            self._metadata.move_to_end(key)
            return value

        return self._once(("described", key, now), lookup, build, store)

    @_locked
    def layout(self, table: Tensor, world_size: int) -> tuple[bytes, Layout]:
        """(digest, ``Layout``) of a rank-major positions ``table`` (int64 [S]) over ``world_size``
        ranks; its segments are found (and the table checked) once per content.

        Raises:
            ValueError: the table is not a permutation of 0 .. S-1 that ``world_size`` divides.
        """
        digest = content_digest((world_size, tuple(table.shape)), [table])
        layout = self._layouts.get(digest)
        if layout is None:
            layout = Layout.from_positions(table.detach().cpu().clone(), world_size)
            layout.segments(table.shape[0], 0)  # reads and checks the table: raises before storing
            self._layouts[digest] = layout
        self._layouts.move_to_end(digest)
        self._trim()
        return digest, layout

    def plan(self, meta: Metadata, key: Hashable, build: Callable[[], T]) -> T:
        """The plan under (``meta``'s digest, ``key``), built on first request (see ``_once``)."""

        def lookup() -> T | None:
            plans = self._plans.get(meta.digest)
            if plans is None:
                return None
            self._plans.move_to_end(meta.digest)
            if key in plans:
                self._hits += 1
            return plans.get(key)

        def store(value: T) -> T:
            self._builds += 1
            self._plans.setdefault(meta.digest, {})[key] = value
            self._plans.move_to_end(meta.digest)
            return value

        return self._once(("plan", meta.digest, key), lookup, build, store)

    def exchange(self, meta: Metadata, key: Hashable, build: Callable[[], T]) -> T:
        """A value derived from ``meta``'s plans (an exchange schedule) under (digest, ``key``), built
        on first request (see ``_once``) and dropped with the digest's plans; not counted in ``info()``."""

        def store(value: T) -> T:
            self._exchanges.setdefault(meta.digest, {})[key] = value
            return value

        return self._once(("exchange", meta.digest, key), lambda: self._exchanges.get(meta.digest, {}).get(key),
                          build, store)

    def _once(self, name: Hashable, lookup: Callable[[], T | None], build: Callable[[], T],
              store: Callable[[T], T]) -> T:
        """``lookup()``'s value, or the value ``build()`` makes, stored with ``store``; the lookup
        and the store run under the lock, the build outside it (counted as planning).

        Outside the lock: a thread planning another batch ahead (``plan_ahead``) never holds up a
        lookup of this one. A thread that asks for what another thread is building waits for that
        build (``name`` identifies it) instead of repeating it, and gets its error if it fails; a
        failed build stores nothing.
        """
        with self._lock:
            value = lookup()
            if value is not None:
                return value
            pending = self._pending.get(name)
            building = pending is None
            if building:
                pending = self._pending[name] = Future()
        if not building:
            return pending.result()
        start = time.perf_counter()
        try:
            value = build()
        except BaseException as error:
            with self._lock:
                self._pending.pop(name, None)  # gone if the cache was cleared meanwhile
            pending.set_exception(error)
            raise
        record_planning(time.perf_counter() - start)
        with self._lock:
            value = store(value)
            self._pending.pop(name, None)  # gone if the cache was cleared meanwhile
            self._trim()
        pending.set_result(value)
        return value

    def _trim(self) -> None:
        while len(self._plans) > self.capacity:
            self._exchanges.pop(self._plans.popitem(last=False)[0], None)
        while len(self._metadata) > 4 * self.capacity:
            self._metadata.popitem(last=False)
        while len(self._layouts) > 4 * self.capacity:
            self._layouts.popitem(last=False)

    @_locked
    def info(self) -> MaskCacheInfo:
        return MaskCacheInfo(self._generation, self._builds, self._hits, len(self._plans), self.capacity,
                             sum(len(p) for p in self._plans.values()), self._described_count)


MASK_CACHE = PlanCache()


def mask_cache_info() -> MaskCacheInfo:
    """Counters of the block-mask plan cache (see ``MaskCacheInfo``)."""
    return MASK_CACHE.info()


def clear_mask_cache() -> None:
    """Drop every cached plan and reset the counters (the capacity stays)."""
    MASK_CACHE.clear()


def set_mask_cache_capacity(contents: int) -> None:
    """Keep the plans of this many metadata contents (default ``DEFAULT_CAPACITY``)."""
    MASK_CACHE.set_capacity(contents)
