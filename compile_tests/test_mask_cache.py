"""The block-mask cache under compile: one build per distinct key and generation, never stale."""

from __future__ import annotations

import torch
from torch._dynamo.testing import CompileCounterWithBackend

from gemma4_flexring import MaskSpec, SequenceInfo, mask_cache_info
from gemma4_flexring.reference import reference_attention

from .compile_cases import LENGTHS, Stack, attend, steps_under_compile


def test_layers_forward_backward_steps_build_exactly_the_distinct_keys():
    """L layers x (forward + backward) x steps, compiled: each step builds one plan per distinct
    mask (the key/value owner is always this rank), every other lookup hits, and the entries of
    the previous step are gone."""
    model = Stack(num_layers=3)
    compiled = torch.compile(model, backend=CompileCounterWithBackend("aot_eager"), fullgraph=True)
    lengths = LENGTHS[:5]
    result = steps_under_compile(model, compiled, lengths, warmup=2)
    distinct = model.distinct_masks()
    assert distinct == 2
    assert result["builds"] == [distinct] * len(lengths)
    assert result["hits"] == [3 * 2 - distinct] * len(lengths)
    assert result["entries"] == [distinct] * len(lengths)
    assert result["generations_match"]
    assert result["max_error"] < 1e-6


def _qkv(seq_len: int):
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(1, h, seq_len, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))


def _check_storage_reuse(fn) -> None:
    seq_len = 32
    q, k, v = _qkv(seq_len)
    documents = (torch.arange(seq_len) // 8).view(1, -1)
    first = SequenceInfo(document_ids=documents)
    out_first = fn(q, k, v, first)
    builds = mask_cache_info().builds

    documents.copy_((torch.arange(seq_len) // 5).view(1, -1))  # same storage, same shape, new content
    second = SequenceInfo(document_ids=documents)
    assert second.document_ids.data_ptr() == first.document_ids.data_ptr()
    out_second = fn(q, k, v, second)

    assert mask_cache_info().builds == builds + 1
    assert mask_cache_info().generation == int(second.generation)
    torch.testing.assert_close(out_second, reference_attention(q, k, v, MaskSpec(sliding_window=4), second, 1.0))
    assert not torch.allclose(out_first, out_second)


def test_storage_reuse_rebuilds_eager():
    """New SequenceInfo over the old tensor storage with new content: masks are rebuilt."""
    _check_storage_reuse(attend)


def test_storage_reuse_rebuilds_compiled():
    """The same under torch.compile, where the compiled code sees the very same tensor object."""
    _check_storage_reuse(torch.compile(attend, backend="aot_eager", fullgraph=True))


def test_new_generation_drops_old_entries():
    """Entries live for one generation: switching generations empties the cache, so going back to
    an older SequenceInfo rebuilds instead of finding its plans."""
    q, k, v = _qkv(32)
    first = SequenceInfo(document_ids=(torch.arange(32) // 8).view(1, -1))
    second = SequenceInfo(document_ids=(torch.arange(32) // 8).view(1, -1))
    attend(q, k, v, first)
    attend(q, k, v, first)
    assert mask_cache_info() == (int(first.generation), 1, 1, 1)
    attend(q, k, v, second)
    assert mask_cache_info() == (int(second.generation), 2, 1, 1)
    attend(q, k, v, first)
    assert mask_cache_info() == (int(first.generation), 3, 1, 1)


def test_generations_differ_across_forked_processes():
    """SequenceInfos built in forked workers (a DataLoader's) and in the parent never share a
    generation, so a batch's metadata sent from a worker cannot hit plans of another batch."""
    import multiprocessing

    from .compile_cases import generations_in_this_process

    SequenceInfo()  # the parent has counted before forking
    with multiprocessing.get_context("fork").Pool(2) as pool:
        children = pool.map(generations_in_this_process, [3, 3])
    parent = generations_in_this_process(3)
    everything = [g for gs in (*children, parent) for g in gs]
    assert len(set(everything)) == len(everything)
