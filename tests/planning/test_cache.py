"""The plan cache: metadata hashed once per generation and stamp, plans per digest, LRU-bounded."""

from __future__ import annotations

import pytest
import torch

from gemma4_flexring import SequenceInfo

from gemma4_flexring.planning import cache


def _info(cut: int) -> SequenceInfo:
    docs = torch.zeros(1, 8, dtype=torch.long)
    docs[0, cut:] = 1
    return SequenceInfo(document_ids=docs)


def _meta(c: cache.PlanCache, info: SequenceInfo):
    return c.metadata(int(info.generation), info.tensors())


def test_generation_is_described_once_then_on_mutation():
    c = cache.PlanCache()
    info = _info(3)
    first = _meta(c, info)
    assert _meta(c, info) is first and c.info().described == 1
    info.document_ids[0, 5:] = 2  # forbidden, but detected through the tensor's version
    assert _meta(c, info).digest != first.digest and c.info().described == 2


def test_equal_content_shares_plans_other_content_does_not():
    c = cache.PlanCache()
    a, same, other = _info(3), _info(3), _info(4)
    assert c.plan(_meta(c, a), "k", lambda: "a") == "a"
    assert c.plan(_meta(c, same), "k", lambda: "rebuilt") == "a"
    assert c.plan(_meta(c, other), "k", lambda: "other") == "other"
    assert c.info()[1:] == (2, 1, 2, cache.DEFAULT_CAPACITY, 2, 3)


def test_least_recently_used_contents_are_evicted():
    c = cache.PlanCache(capacity=2)
    infos = [_info(cut) for cut in (2, 3, 4)]
    for info in infos[:2]:
        c.plan(_meta(c, info), "k", lambda: "built")
    c.plan(_meta(c, infos[0]), "k", lambda: "rebuilt")  # 2 is now the most recent
    c.plan(_meta(c, infos[2]), "k", lambda: "built")    # evicts 3
    assert c.info().generations == 2
    assert c.plan(_meta(c, infos[1]), "k", lambda: "rebuilt") == "rebuilt"
    assert c.plan(_meta(c, infos[2]), "k", lambda: "rebuilt") == "built"


def test_a_failed_build_stores_nothing():
    c = cache.PlanCache()
    meta = _meta(c, _info(3))

    def fail():
        raise RuntimeError("planning failed")

    with pytest.raises(RuntimeError):
        c.plan(meta, "k", fail)
    assert c.info().generations == 0 and c.info().entries == 0
    assert c.plan(meta, "k", lambda: "ok") == "ok"


def test_capacity_is_settable_and_checked():
    c = cache.PlanCache()
    for cut in range(1, 6):
        c.plan(_meta(c, _info(cut)), "k", lambda: "built")
    c.set_capacity(3)
    assert c.info().generations == 3 and c.info().capacity == 3
    with pytest.raises(ValueError, match="positive int"):
        c.set_capacity(0)


def test_a_plan_being_built_is_waited_for_not_built_again():
    """Two threads ask for one plan: the second waits for the first one's build (a thread planning
    ahead and the ring asking for the same batch), and a lookup of another plan meanwhile is not
    held up by that build."""
    import threading

    c = cache.PlanCache()
    meta = _meta(c, _info(3))
    started, release, builds = threading.Event(), threading.Event(), []

    def slow_build():
        builds.append(1)
        started.set()
        release.wait(timeout=30)
        return "plan"

    results = []
    first = threading.Thread(target=lambda: results.append(c.plan(meta, "k", slow_build)))
    first.start()
    started.wait(timeout=30)
    assert c.plan(meta, "other", lambda: "quick") == "quick"  # not blocked by the slow build
    second = threading.Thread(target=lambda: results.append(c.plan(meta, "k", slow_build)))
    second.start()
    release.set()
    first.join(timeout=30)
    second.join(timeout=30)
    assert results == ["plan", "plan"] and len(builds) == 1


def test_a_failed_build_raises_and_stores_nothing():
    c = cache.PlanCache()
    meta = _meta(c, _info(3))

    def broken():
        raise RuntimeError("planning failed")

    with pytest.raises(RuntimeError, match="planning failed"):
        c.plan(meta, "k", broken)
    assert c.plan(meta, "k", lambda: "second try") == "second try"
