"""Inputs and rank workers of the numerics tests: the ring's error against one device's
(``cases.ErrorCase``), and PyTorch's context-parallel SDPA test setting.

Shape legend: B batch rows, S whole sequence, Hq query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import Layout, MaskSpec, ring_attention
from .cases import ErrorCase
from .reference import reference_gradients, reference_mask


def error_inputs(case: ErrorCase) -> list[Tensor]:
    """Whole-sequence q [B, Hq, S, D], k, v [B, Hkv, S, D] and an output gradient in ``case.dtype``."""
    g = torch.Generator().manual_seed(case.seed)
    draw = torch.rand if case.draw == "rand" else torch.randn
    b, s, d = case.batch, case.seq_len, case.head_dim
    shapes = [(b, case.q_heads, s, d), (b, case.kv_heads, s, d), (b, case.kv_heads, s, d)]
    qkv = [draw(*shape, generator=g, dtype=torch.float64) for shape in shapes]
    grad = torch.randn(b, case.q_heads, s, d, generator=g, dtype=torch.float64)
    return [t.to(case.dtype) for t in (*qkv, grad)]


def golden(case: ErrorCase) -> list[Tensor]:
    """Float64 (out, dq, dk, dv) of the same (rounded) inputs."""
    return reference_gradients(*error_inputs(case), case.mask, case.info())


def one_device(case: ErrorCase) -> list[Tensor]:
    """(out, dq, dk, dv) of ``F.scaled_dot_product_attention`` on the whole sequence, in ``case.dtype``."""
    *qkv, grad = error_inputs(case)
    qkv = [t.requires_grad_(True) for t in qkv]
    if case.spec == "causal":
        out = F.scaled_dot_product_attention(*qkv, is_causal=True, enable_gqa=True)
    else:
        mask = reference_mask(case.mask, case.info(), case.batch, case.seq_len).unsqueeze(1)
        out = F.scaled_dot_product_attention(*qkv, attn_mask=mask, enable_gqa=True)
    return [out.detach(), *torch.autograd.grad(out, qkv, grad)]


def ring_errors_rank(rank: int, world_size: int, cases: list[ErrorCase], layout_kind: str) -> list:
    """This rank's (out, dq, dk, dv) shards for every case."""
    layout = Layout(layout_kind, world_size)
    results = []
    for case in cases:
        *qkv, grad = error_inputs(case)
        local = [layout.shard(t, 2, rank).clone().requires_grad_(True) for t in qkv]
        out = ring_attention(*local, mask=case.mask, info=case.info(), layout=layout)
        out.backward(layout.shard(grad, 2, rank))
        results.append((out.detach(), *(t.grad for t in local)))
    return results


# PyTorch's test_ring_attention_sdpa (test/distributed/tensor/test_attention.py): causal,
# load-balanced (zigzag), float32, torch.rand inputs, out.sum().backward(), compared with
# non-CP SDPA by torch.allclose (``tolerances.SDPA_PORT``).
SDPA_PORT = dict(heads=8, seq_len=4096, head_dim=32, world_size=4, seed=10)


def sdpa_port_inputs(batch: int) -> list[Tensor]:
    """q, k, v [B, 8, 4096, 32], float32, torch.rand."""
    g = torch.Generator().manual_seed(SDPA_PORT["seed"])
    shape = (batch, SDPA_PORT["heads"], SDPA_PORT["seq_len"], SDPA_PORT["head_dim"])
    return [torch.rand(shape, generator=g) for _ in range(3)]


def sdpa_port_rank(rank: int, world_size: int, batch: int) -> tuple[Tensor, ...]:
    layout = Layout("zigzag", world_size)
    local = [layout.shard(t, 2, rank).requires_grad_(True) for t in sdpa_port_inputs(batch)]
    out = ring_attention(*local, mask=MaskSpec(causal=True), layout=layout)
    out.sum().backward()
    return (out.detach(), *(t.grad for t in local))


def sdpa_port_one_device(batch: int) -> tuple[Tensor, ...]:
    qkv = [t.requires_grad_(True) for t in sdpa_port_inputs(batch)]
    out = F.scaled_dot_product_attention(*qkv, is_causal=True)
    out.sum().backward()
    return (out.detach(), *(t.grad for t in qkv))
