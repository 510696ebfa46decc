"""Bad input: a clear error on every rank, before any exchange, and no hang."""

from __future__ import annotations

import pytest
import torch

from gemma4_flexring import Layout, MaskSpec, SequenceInfo, ring_attention
from gemma4_flexring.testing import misuse
from gemma4_flexring.testing.launch import Cluster


def qkv(b=1, hq=4, hkv=2, s=8, d=8, dtype=torch.float32):
    return torch.randn(b, hq, s, d, dtype=dtype), torch.randn(b, hkv, s, d, dtype=dtype), torch.randn(b, hkv, s, d, dtype=dtype)


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.randn(4, 8, 8), *qkv()[1:]), "4-D"),
    (lambda: (qkv()[0], qkv(dtype=torch.float64)[1], qkv()[2]), "one dtype"),
    (lambda: tuple(t.long() for t in qkv()), "one dtype"),
    (lambda: qkv(hq=3, hkv=2), "multiple of key/value heads"),
    (lambda: (qkv()[0], qkv(s=6)[1], qkv(s=6)[2]), "S_local=8"),
    (lambda: (qkv()[0], qkv(d=4)[1], qkv()[2]), "one shape"),
])
def test_bad_tensors(make, match):
    with pytest.raises(ValueError, match=match):
        ring_attention(*make())


def test_wrong_argument_types():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q must be a Tensor"):
        ring_attention(q.numpy(), k, v)
    with pytest.raises(TypeError, match="mask must be a MaskSpec"):
        ring_attention(q, k, v, mask={"causal": True})
    with pytest.raises(TypeError, match="info must be a SequenceInfo"):
        ring_attention(q, k, v, info=torch.zeros(1, 8))
    with pytest.raises(TypeError, match="layout must be a Layout"):
        ring_attention(q, k, v, layout="zigzag")
    with pytest.raises(TypeError, match="group must be"):
        ring_attention(q, k, v, group="world")


def test_layout_and_metadata_checks():
    q, k, v = qkv(s=7)
    with pytest.raises(ValueError, match="multiple of 2"):
        ring_attention(q, k, v, layout=Layout("zigzag", 1))
    with pytest.raises(ValueError, match="layout is for 2 ranks"):
        ring_attention(*qkv(), layout=Layout("zigzag", 2))
    with pytest.raises(ValueError, match="whole sequence"):
        ring_attention(*qkv(), info=SequenceInfo(document_ids=torch.zeros(1, 9, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"whole sequence \[B=2"):
        ring_attention(*qkv(b=2), info=SequenceInfo(padding=torch.zeros(1, 8, dtype=torch.bool)))


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_scale_must_be_positive_and_finite(scale):
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        ring_attention(*qkv(), scale=scale)


def test_empty_head_dim_is_reported_not_divided_by():
    with pytest.raises(ValueError, match="head dim"):
        ring_attention(*qkv(d=0))


def test_huge_window_means_no_window():
    q, k, v = qkv()
    torch.testing.assert_close(ring_attention(q, k, v, mask=MaskSpec(sliding_window=2**63)),
                               ring_attention(q, k, v, mask=MaskSpec()), rtol=0, atol=0)


def test_fully_masked_input_gives_zeros_not_nans():
    q, k, v = (t.requires_grad_(True) for t in qkv())
    info = SequenceInfo(padding=torch.ones(1, 8, dtype=torch.bool))
    out = ring_attention(q, k, v, mask=MaskSpec(causal=False), info=info)
    out.sum().backward()
    assert out.abs().max() == 0 and q.grad.abs().max() == 0 and k.grad.abs().max() == 0


@pytest.mark.parametrize("worker, match", [
    (misuse.lengths_differ, "ranks disagree on local_len"),
    (misuse.one_rank_bad_dtype, "rank 1: q, k, v must share one dtype"),
    (misuse.metadata_differs, "ranks disagree on metadata (document_ids, block_ids, padding)"),
    (misuse.rows_permuted, "ranks disagree on metadata (document_ids, block_ids, padding)"),
    (misuse.scales_differ, "ranks disagree on scale: rank 0: 1.0, rank 1: 0.5"),
    (misuse.masks_differ, "ranks disagree on sliding_window"),
])
def test_misuse_across_ranks_raises_on_every_rank(cluster, worker, match):
    errors = cluster(2).errors(worker)
    for name, message in errors:
        assert name == "ValueError", errors
        assert match in message and "no exchange was started" in message
    assert len(cluster(2).run(misuse.then_works)) == 2


@pytest.mark.parametrize("worker, match", [
    (misuse.one_rank_wrong_mask_type, "rank 1: mask must be a MaskSpec or a FlexMask, got dict"),
    (misuse.one_rank_layout_for_another_world, "rank 1: layout is for 3 ranks, the group has 2"),
    (misuse.one_rank_meta_keys, "rank 1: q, k, v must be on one device, got cpu, meta, meta"),
])
def test_argument_errors_on_one_rank_raise_on_every_rank(cluster, worker, match):
    """Found before the op on one rank only: that rank joins the others' agreement as failed."""
    errors = cluster(2).errors(worker)
    for name, message in errors:
        assert name == "ValueError" and match in message, errors
    assert len(cluster(2).run(misuse.then_works)) == 2


@pytest.mark.parametrize("worker, match", [
    (misuse.shard_with_wrong_rank, "rank 1: rank 0 is not this process's rank 1 in the CP group"),
    (misuse.shard_for_a_model_without_the_ring, "the model's attention is not 'gemma4_flexring'"),
])
def test_shard_inputs_errors_raise_on_every_rank(cluster, worker, match):
    errors = cluster(2).errors(worker)
    for name, message in errors:
        assert name == "ValueError" and match in message and message.startswith("shard_inputs"), errors


def test_mixed_devices_are_rejected_not_dispatched_to_the_fake_kernel():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="must be on one device, got cpu, meta, meta"):
        ring_attention(q, k.to("meta"), v.to("meta"))


def test_double_backward_names_the_unsupported_feature():
    q, k, v = (t.requires_grad_(True) for t in qkv(dtype=torch.float64))
    out = ring_attention(q, k, v)
    dq, = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="gemma4_flexring: double backward .* is not supported"):
        dq.sum().backward()


def test_a_failed_call_leaves_nothing_half_built(monkeypatch):
    """Planning fails: a clear error, nothing cached for that batch, and the next call works."""
    from gemma4_flexring import clear_mask_cache, mask_cache_info
    from gemma4_flexring import prepare

    clear_mask_cache()
    q, k, v = qkv()
    info = SequenceInfo(document_ids=torch.tensor([[0] * 4 + [1] * 4]))

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory while planning")

    with monkeypatch.context() as patch:
        patch.setattr(prepare, "plan_pair", broken)
        with pytest.raises(ValueError, match="planning the ring's masks failed: RuntimeError: out of memory"):
            ring_attention(q, k, v, info=info)
    assert (mask_cache_info().generations, mask_cache_info().entries) == (0, 0)
    out = ring_attention(q, k, v, info=info)
    assert torch.isfinite(out).all() and mask_cache_info().builds == 1


def test_a_peer_failing_after_the_agreement_is_reported_within_the_timeout():
    """Rank 1 raises after the agreement; rank 0, waiting in the exchange, gets an error that names
    the exchange once the group's timeout (here 3 s, not the default 30 minutes) has passed. Its
    own processes: the failed exchange leaves that group unusable."""
    cluster = Cluster(2)
    try:
        (name0, message0, seconds0), (name1, message1, _) = cluster.run(misuse.peer_fails_after_agreement, 3.0)
    finally:
        cluster.close()
    assert (name1, message1) == ("RuntimeError", "simulated: out of memory in the chunk kernel")
    assert name0 == "RuntimeError" and "ring exchange of the forward pass failed" in message0
    assert 3.0 <= seconds0 < 300  # the group's timeout, far below the default 30 minutes
