"""Rank workers that hand the ring inconsistent inputs on purpose (the validation tests): each
raises on every rank, or, with ``then_works``, shows the group still serves."""

from __future__ import annotations

import torch

from .. import Layout, MaskSpec, SequenceInfo, ring_attention


def _qkv(local_len: int, dtype=torch.float32, q_heads: int = 4):
    """q [1, Hq, L, 8], k, v [1, 2, L, 8]."""
    return (torch.randn(1, q_heads, local_len, 8, dtype=dtype), torch.randn(1, 2, local_len, 8, dtype=dtype),
            torch.randn(1, 2, local_len, 8, dtype=dtype))


def lengths_differ(rank: int, world_size: int) -> None:
    ring_attention(*_qkv(8 + 2 * rank), layout=Layout("zigzag", world_size))


def one_rank_bad_dtype(rank: int, world_size: int) -> None:
    q, k, v = _qkv(8)
    if rank == 1:
        k = k.double()
    ring_attention(q, k, v, layout=Layout("contiguous", world_size))


def metadata_differs(rank: int, world_size: int) -> None:
    docs = torch.zeros(1, 8 * world_size, dtype=torch.long)
    docs[0, 3 + rank:] = 1
    ring_attention(*_qkv(8), info=SequenceInfo(document_ids=docs), layout=Layout("contiguous", world_size))


def rows_permuted(rank: int, world_size: int) -> None:
    """The same padding counts and positions, in another row order on rank 1."""
    padding = torch.zeros(2, 8 * world_size, dtype=torch.bool)
    padding[0, [0, 3]] = True
    padding[1, [1, 2]] = True
    if rank == 1:
        padding = padding.flip(0)
    q, k, v = (torch.cat([t, t]) for t in _qkv(8))
    ring_attention(q, k, v, info=SequenceInfo(padding=padding), layout=Layout("contiguous", world_size))


def scales_differ(rank: int, world_size: int) -> None:
    ring_attention(*_qkv(8), scale=1.0 / (1 + rank), layout=Layout("contiguous", world_size))


def masks_differ(rank: int, world_size: int) -> None:
    ring_attention(*_qkv(8), mask=MaskSpec(sliding_window=4 + rank), layout=Layout("contiguous", world_size))


def then_works(rank: int, world_size: int) -> float:
    """After the failures the group is still usable."""
    out = ring_attention(*_qkv(8), layout=Layout("contiguous", world_size))
    return float(out.abs().sum())


def one_rank_wrong_mask_type(rank: int, world_size: int) -> None:
    mask = {"causal": True} if rank == 1 else MaskSpec()
    ring_attention(*_qkv(8), mask=mask, layout=Layout("contiguous", world_size))


def one_rank_layout_for_another_world(rank: int, world_size: int) -> None:
    ring_attention(*_qkv(8), layout=Layout("contiguous", world_size + rank))


def bad_kernel_on_rank_zero(rank: int, world_size: int, name: str) -> None:
    """Rank 0 asks for kernel ``name``, the others for the default: all must raise."""
    ring_attention(*_qkv(8), layout=Layout("contiguous", world_size), kernel=name if rank == 0 else None)


def one_rank_meta_keys(rank: int, world_size: int) -> None:
    q, k, v = _qkv(8)
    if rank == 1:
        k, v = k.to("meta"), v.to("meta")
    ring_attention(q, k, v, layout=Layout("contiguous", world_size))


def _shard(rank: int, world_size: int, ring: bool, rank_given: int) -> None:
    from ..integrations import transformers as hf
    from .tiny_gemma4 import CASES, make_model

    hf.shard_inputs(make_model(CASES["packed"], ring=ring), input_ids=torch.zeros(1, 8, dtype=torch.long),
                    layout=Layout("zigzag", world_size), rank=rank_given)


def shard_with_wrong_rank(rank: int, world_size: int) -> None:
    _shard(rank, world_size, ring=True, rank_given=(rank + 1) % world_size if rank == 1 else rank)


def shard_for_a_model_without_the_ring(rank: int, world_size: int) -> None:
    _shard(rank, world_size, ring=False, rank_given=rank)


def peer_fails_after_agreement(rank: int, world_size: int, timeout_s: float) -> tuple[str, str, float]:
    """On a group with a short timeout, rank 1 raises after the ranks agreed (as a kernel running
    out of memory would); rank 0 waits in the exchange. Returns (error type, message, seconds)."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from .. import ops

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    real_forward = ops.ring_forward

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("simulated: out of memory in the chunk kernel")

    if rank == 1:
        ops.ring_forward = out_of_memory
    start = time.monotonic()
    try:
        ring_attention(*_qkv(8), mask=MaskSpec(causal=False), layout=Layout("contiguous", world_size), group=group)
    except RuntimeError as e:
        return type(e).__name__, str(e), time.monotonic() - start
    finally:
        ops.ring_forward = real_forward
    return "", "", time.monotonic() - start
