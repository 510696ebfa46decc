"""The block-mask cache under compile: one build per distinct key and generation, never stale."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from torch._dynamo.testing import CompileCounterWithBackend

from gemma4_flexring import MaskSpec, SequenceInfo, mask_cache_info
from gemma4_flexring.testing.reference import reference_attention
from gemma4_flexring.testing.compiled import LENGTHS, Stack, attend, steps_under_compile


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
    assert result["entries"] == [distinct * (step + 1) for step in range(len(lengths))]  # within capacity
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


def test_interleaved_micro_batches_build_each_plan_once():
    """Forward A, forward B, backward A, backward B (a pipeline schedule): every plan is built once,
    and each backward gets its own batch's masks."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(32))
    a = SequenceInfo(document_ids=(torch.arange(32) // 8).view(1, -1))
    b = SequenceInfo(document_ids=(torch.arange(32) // 5).view(1, -1), padding=torch.arange(32).view(1, -1) > 29)
    out_a, out_b = attend(q, k, v, a), attend(q, k, v, b)
    assert mask_cache_info().builds == 2
    grads_a, grads_b = (torch.autograd.grad(out, (q, k, v), torch.ones_like(out)) for out in (out_a, out_b))
    info = mask_cache_info()
    assert (info.builds, info.hits, info.generations) == (2, 2, 2)
    for got, info in ((grads_a, a), (grads_b, b)):
        want = reference_attention(q, k, v, MaskSpec(sliding_window=4), info, 1.0)
        torch.testing.assert_close(got, torch.autograd.grad(want, (q, k, v), torch.ones_like(want)))


def test_equal_content_shares_plans():
    """A new SequenceInfo with the same content (a static packing, say) reuses the plans."""
    q, k, v = _qkv(32)
    for _ in range(3):
        attend(q, k, v, SequenceInfo(document_ids=(torch.arange(32) // 8).view(1, -1)))
    info = mask_cache_info()
    assert (info.builds, info.hits, info.generations, info.described) == (1, 2, 1, 3)


def test_generations_differ_across_forked_processes():
    """SequenceInfos built in forked workers (a DataLoader's) and in the parent never share a
    generation, so a batch's metadata sent from a worker cannot hit plans of another batch."""
    import multiprocessing

    from gemma4_flexring.testing.compiled import generations_in_this_process

    SequenceInfo(shape=(1, 1))  # the parent has counted before forking
    with multiprocessing.get_context("fork").Pool(2) as pool:
        children = pool.map(generations_in_this_process, [3, 3])
    parent = generations_in_this_process(3)
    everything = [g for gs in (*children, parent) for g in gs]
    assert len(set(everything)) == len(everything)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_changed_metadata_is_never_served_stale(compiled):
    """Content changed under an old generation (an in-place write, forbidden but detected through
    the tensor's version) or mapped into a new SequenceInfo: each call gets its own batch's masks."""
    fn = torch.compile(attend, backend="aot_eager", fullgraph=True) if compiled else attend
    q, k, v = _qkv(32)
    info = SequenceInfo(document_ids=(torch.arange(32) // 8).view(1, -1))
    fn(q, k, v, info)
    info.document_ids.copy_((torch.arange(32) // 5).view(1, -1))
    mapped = pytree.tree_map(lambda t: t.flip(-1), info)
    for case in (info, mapped):
        want = reference_attention(q, k, v, MaskSpec(sliding_window=4), case, 1.0)
        torch.testing.assert_close(fn(q, k, v, case), want)
    assert mask_cache_info().builds == 3
