"""FlexMask: naming, refusals (lambdas, score mods, per-head masks, ranks that disagree), the
presets against attention-gym's and transformers' definitions, caching per content, plan-ahead
and balance. The ring's numbers under FlexMasks are checked in ``tests/test_ring.py``."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import chunked_causal_mask_function

from gemma4_flexring import (FlexMask, Layout, MaskSpec, SequenceInfo, clear_mask_cache, mask_cache_info, plan_ahead,
                             presets, ring_attention)
from gemma4_flexring.ahead import wait_for_planning
from gemma4_flexring.layout import document_work
from gemma4_flexring.planning.flexmask import resolve_factory
from gemma4_flexring.testing import attention_gym
from gemma4_flexring.testing.cases import FLEX_MASKS, per_head
from gemma4_flexring.testing.reference import reference_attention
from gemma4_flexring.testing.workers import disagreeing_flex_masks


def _grid(mask_mod, batch: int, seq_len: int) -> torch.Tensor:
    """``mask_mod`` at every (b, q, kv), entry by entry in Python ints wrapped as 0-d tensors
    (as attention-gym's visualiser calls it): bool [B, S, S]."""
    t = lambda x: torch.tensor(x)  # noqa: E731
    return torch.tensor([[[bool(mask_mod(t(b), t(0), t(i), t(j))) for j in range(seq_len)] for i in range(seq_len)]
                         for b in range(batch)])


def _preset(factory, **tensors) -> torch.Tensor:
    """A preset's mask on the [1, 40, 40] grid, evaluated the way the ring does (broadcast)."""
    b, i, j = torch.zeros(1, 1, 1, dtype=torch.long), torch.arange(40).view(1, -1, 1), torch.arange(40).view(1, 1, -1)
    return factory(**tensors)(b, torch.zeros((), dtype=torch.long), i, j).expand(1, 40, 40)


DOCUMENT_LENGTHS = [7, 13, 2, 18]


@pytest.mark.parametrize("preset, tensors, reference", [
    (presets.causal, {}, attention_gym.causal_mask),
    (presets.sliding_window, {"window": torch.tensor(5)}, attention_gym.generate_sliding_window(5)),
    (presets.prefix_lm, {"prefix": torch.tensor(9)}, attention_gym.generate_prefix_lm_mask(9)),
    (presets.dilated_sliding_window, {"window": torch.tensor(8), "dilation": torch.tensor(3)},
     attention_gym.generate_dilated_sliding_window(8, 3)),
    (presets.chunked, {"chunk": torch.tensor(6)}, chunked_causal_mask_function(6, torch.zeros(1, dtype=torch.long))),
])
@pytest.mark.parametrize("documents", [False, True])
def test_presets_match_their_definitions(preset, tensors, reference, documents):
    """Each preset is its attention-gym (chunked: transformers' Llama 4) mask_mod; with
    ``document_ids`` it is attention-gym's ``generate_doc_mask_mod`` over it."""
    if documents:
        offsets = attention_gym.length_to_offsets(DOCUMENT_LENGTHS, "cpu")
        reference = attention_gym.generate_doc_mask_mod(reference, offsets)
        ids = attention_gym.offsets_to_doc_ids(offsets).view(1, -1)
        tensors = {**tensors, "document_ids": ids}
    assert torch.equal(_preset(preset, **tensors), _grid(reference, 1, 40))


def test_global_tokens_see_and_are_seen_by_all():
    is_global = torch.zeros(1, 40, dtype=torch.bool)
    is_global[0, [3, 30]] = True
    got = _preset(presets.global_tokens, is_global=is_global)[0]
    causal = _preset(presets.causal)[0]
    assert got[3].all() and got[:, 30].all() and got[30].all() and got[:, 3].all()
    others = [p for p in range(40) if p not in (3, 30)]
    assert torch.equal(got[others][:, others], causal[others][:, others])
    windowed = _preset(presets.global_tokens, is_global=is_global, window=torch.tensor(4))[0]
    window = _preset(presets.sliding_window, window=torch.tensor(4))[0]
    assert torch.equal(windowed[others][:, others], window[others][:, others])
    # Per document: a global token sees and is seen by all of its own document, nothing else.
    documents = (torch.arange(40) >= 20).long().view(1, 40)
    per_document = _preset(presets.global_tokens, is_global=is_global, document_ids=documents)[0]
    same = documents[0, :, None] == documents[0, None, :]
    expected = same & (causal | is_global[0, :, None] | is_global[0, None, :])
    expected[20:, 20:] = same[20:, 20:] & (causal[:20, :20] | is_global[0, None, 20:] | is_global[0, 20:, None])
    assert torch.equal(per_document, expected)


def test_factories_are_found_by_name():
    assert resolve_factory("gemma4_flexring.presets.prefix_lm") is presets.prefix_lm
    assert FlexMask(presets.prefix_lm, prefix=torch.tensor(3)).op_name == "gemma4_flexring.presets.prefix_lm|prefix"
    with pytest.raises(ValueError, match="cannot be found"):
        resolve_factory("gemma4_flexring.presets.no_such_mask")


def test_a_nameless_factory_is_refused_and_a_named_one_is_registered():
    with pytest.raises(ValueError, match="define it at module level"):
        FlexMask(lambda: presets.causal())

    def local():
        return presets.causal()

    with pytest.raises(ValueError, match="pass name="):
        FlexMask(local)
    mask = FlexMask(local, name="tests.local_causal")
    assert resolve_factory("tests.local_causal") is local
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(3))
    assert torch.allclose(ring_attention(q, k, v, mask=mask), reference_attention(q, k, v, MaskSpec()), atol=1e-12)


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(TypeError, match="score mods are not supported"):
        FlexMask(presets.causal, score_mod=lambda score, b, h, q, kv: score)
    with pytest.raises(TypeError, match="must be Tensors"):
        FlexMask(presets.sliding_window, window=5)
    with pytest.raises(TypeError, match="must be a function"):
        FlexMask("causal")
    mask = FlexMask(presets.causal)
    with pytest.raises(AttributeError, match="immutable"):
        mask.name = "other"
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(TypeError, match="MaskSpec or a FlexMask"):
        ring_attention(q, q, q, mask="causal")


def score_factory():
    """A factory returning a score_mod (refused)."""
    return lambda score, b, h, q_idx, kv_idx: score


def int_factory():
    """A factory whose mask_mod returns ints (refused)."""
    return lambda b, h, q_idx, kv_idx: kv_idx - q_idx


@pytest.mark.parametrize("mask, message", [
    (lambda: FlexMask(per_head, first_heads=torch.tensor(1)), "reads h"),
    (lambda: FlexMask(score_factory), "score_mod"),
    (lambda: FlexMask(int_factory), "bool tensor"),
])
def test_masks_the_ring_cannot_serve_exactly_are_refused(mask, message):
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match=message):
        ring_attention(q, q, q, mask=mask())


def test_ranks_that_disagree_on_a_flexmask_all_raise(cluster):
    """Same factory, other tensor content on one rank: every rank raises before any exchange."""
    results = cluster(2).run(disagreeing_flex_masks)
    assert all("ranks disagree on FlexMask" in r for r in results), results


def test_a_flexmask_is_described_once_and_plans_are_shared_by_content():
    clear_mask_cache()
    q, k, v = (torch.randn(2, 2, 32, 8) for _ in range(3))
    info = SequenceInfo(shape=(2, 32))
    mask = FlexMask(presets.prefix_lm, prefix=torch.tensor([5, 9]))
    ring_attention(q, k, v, mask=mask, info=info)
    first = mask_cache_info()
    ring_attention(q, k, v, mask=mask, info=info)
    again = mask_cache_info()
    assert again.described == first.described and again.builds == first.builds and again.hits > first.hits
    ring_attention(q, k, v, mask=FlexMask(presets.prefix_lm, prefix=torch.tensor([5, 9])), info=info)
    same_content = mask_cache_info()
    assert same_content.described == again.described + 1 and same_content.builds == again.builds
    ring_attention(q, k, v, mask=FlexMask(presets.prefix_lm, prefix=torch.tensor([5, 10])), info=info)
    assert mask_cache_info().builds > same_content.builds


def test_plan_ahead_takes_flexmasks():
    clear_mask_cache()
    q, k, v = (torch.randn(2, 2, 32, 8) for _ in range(3))
    info = SequenceInfo(document_ids=(torch.arange(32) // 10).expand(2, 32))
    mask = FlexMask(presets.chunked, chunk=torch.tensor(6))
    plan_ahead(info, [mask, MaskSpec()]).result()
    wait_for_planning()
    built = mask_cache_info().builds
    ring_attention(q, k, v, mask=mask, info=info)
    assert mask_cache_info().builds == built


def test_balance_counts_a_flexmask_keys_as_its_maskspec():
    """A FlexMask weighs what its MaskSpec twin weighs: causal, and a window (the preset's window w
    holds w + 1 keys); a per-row prefix weighs more where the prefix is longer."""
    docs = (torch.arange(96) // 23).expand(2, 96)
    assert torch.equal(document_work(docs, [(FlexMask(presets.causal), 2)]), document_work(docs, [(MaskSpec(), 2)]))
    assert torch.equal(document_work(docs, [(FlexMask(presets.sliding_window, window=torch.tensor(6)), 1)]),
                       document_work(docs, [(MaskSpec(sliding_window=7), 1)]))
    work = document_work(docs, [(FlexMask(presets.prefix_lm, prefix=torch.tensor([0, 40])), 1)])
    assert (work >= document_work(docs)).all() and (work > document_work(docs)).any()
    layout = Layout.balanced(SequenceInfo(document_ids=docs), 4, masks=[(FLEX_MASKS["flex_global"](2, 96), 1)])
    assert sorted(layout.table(96).tolist()) == list(range(96))


def test_a_pickled_flexmask_is_the_same_mask_with_a_new_generation():
    import copy
    import pickle

    mask = FlexMask(presets.prefix_lm, prefix=torch.tensor([3, 5]))
    for other in (pickle.loads(pickle.dumps(mask)), copy.deepcopy(mask)):
        assert other.op_name == mask.op_name and torch.equal(other.tensors["prefix"], mask.tensors["prefix"])
        assert int(other.generation) != int(mask.generation)


PRESET_MASKS = ["flex_causal", "flex_sliding", "flex_chunked", "flex_prefix_lm", "flex_global", "flex_global_window",
                "flex_dilated", "flex_prefix_lm_documents", "flex_chunked_documents"]


@pytest.mark.parametrize("name", PRESET_MASKS)
def test_preset_block_classes_are_sound(name):
    """On random runs of positions (blocks of every size, spans of any lengths) a preset's class
    FULL holds only allowed entries and EMPTY none, in every batch row it speaks for; and on
    aligned blocks the classes decide some blocks (they are not all partial)."""
    from gemma4_flexring.planning.blocks import EMPTY, FULL, Blocks, Spans

    batch, seq_len = 2, 96
    mask = FLEX_MASKS[name](batch, seq_len)
    mask_mod = mask.factory(**mask.tensors)
    b, i, j = torch.arange(batch).view(-1, 1, 1), torch.arange(seq_len).view(1, -1, 1), torch.arange(seq_len).view(1, 1, -1)
    allowed = mask_mod(b, torch.zeros((), dtype=torch.long), i, j).expand(batch, seq_len, seq_len)
    g = torch.Generator().manual_seed(0)
    decided = 0
    for trial in range(40):
        cuts = torch.randperm(seq_len - 1, generator=g)[:int(torch.randint(1, 12, (1,), generator=g))] + 1
        edges = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([seq_len])])
        spans = Spans(edges[:-1], edges[1:] - 1)
        size = int(torch.randint(1, 20, (1,), generator=g))
        blocks = Blocks(int(torch.randint(0, 30, (1,), generator=g)), seq_len - 30, size, torch.device("cpu"))
        for q, k in ((spans, spans), (blocks, spans), (blocks, blocks)):
            cls = mask_mod.block_classes(q, k).expand(batch, q.count, k.count)
            (q_first, q_last), (k_first, k_last) = q.bounds(), k.bounds()
            for row, qi, ki in cls.ne(1).nonzero().tolist():
                region = allowed[row, q_first[qi]:q_last[qi] + 1, k_first[ki]:k_last[ki] + 1]
                assert bool(region.all() if cls[row, qi, ki] == FULL else ~region.any()), (name, trial, row, qi, ki)
            decided += int((cls == EMPTY).sum() + (cls == FULL).sum())
    assert decided > 0


def test_a_direct_op_call_without_the_flexmask_generation_raises():
    """The op's own checks: a FlexMask's name without its generation is refused before planning."""
    mask = FlexMask(presets.prefix_lm, prefix=torch.tensor(3))
    info, q = SequenceInfo(shape=(1, 16)), torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="mask_generation must be an int64 scalar"):
        torch.ops.gemma4_flexring.ring_attention(q, q, q, info.generation, *info.tensors(), torch.arange(16),
                                                 mask.op_tensors(q.device), False, None, False, "", None, "",
                                                 mask.op_name, None)
