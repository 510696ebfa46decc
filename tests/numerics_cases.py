"""Workers and inputs for the numerics tests: the ring's error against one device's, and
PyTorch's context-parallel SDPA test setting."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gemma4_flexring import Layout, MaskSpec, SequenceInfo, ring_attention
from gemma4_flexring.testing.reference import reference_attention, reference_mask

ERROR_SPECS = {
    "causal": MaskSpec(causal=True),
    "window_documents": MaskSpec(causal=True, sliding_window=100),
}


@dataclass(frozen=True)
class ErrorCase:
    """One error comparison. ``draw``: "rand" (PyTorch's CP test draws torch.rand: all-positive
    scores and a large LSE, where a float32 merge hurt most) or "randn"."""

    spec: str
    dtype: torch.dtype
    draw: str = "rand"
    batch: int = 1
    q_heads: int = 4
    kv_heads: int = 2
    seq_len: int = 288  # splits into 2, 3 and 4 ranks' zigzag pieces
    head_dim: int = 32
    seed: int = 0

    @property
    def mask(self) -> MaskSpec:
        return ERROR_SPECS[self.spec]

    def info(self) -> SequenceInfo | None:
        if self.spec != "window_documents":
            return None
        docs = torch.zeros(self.batch, self.seq_len, dtype=torch.long)
        docs[:, self.seq_len // 3:] = 1
        docs[:, self.seq_len * 3 // 4:] = 2
        return SequenceInfo(document_ids=docs)


def error_inputs(case: ErrorCase) -> list[torch.Tensor]:
    """Whole-sequence q, k, v and an output gradient in ``case.dtype``."""
    g = torch.Generator().manual_seed(case.seed)
    draw = torch.rand if case.draw == "rand" else torch.randn
    b, s, d = case.batch, case.seq_len, case.head_dim
    shapes = [(b, case.q_heads, s, d), (b, case.kv_heads, s, d), (b, case.kv_heads, s, d)]
    qkv = [draw(*shape, generator=g, dtype=torch.float64) for shape in shapes]
    grad = torch.randn(b, case.q_heads, s, d, generator=g, dtype=torch.float64)
    return [t.to(case.dtype) for t in (*qkv, grad)]


def golden(case: ErrorCase) -> list[torch.Tensor]:
    """Float64 (out, dq, dk, dv) of the same (rounded) inputs."""
    *qkv, grad = (t.to(torch.float64) for t in error_inputs(case))
    qkv = [t.requires_grad_(True) for t in qkv]
    out = reference_attention(*qkv, case.mask, case.info())
    return [out.detach(), *torch.autograd.grad(out, qkv, grad)]


def one_device(case: ErrorCase) -> list[torch.Tensor]:
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
# non-CP SDPA by torch.allclose(atol=2e-6) (rtol default 1e-5).
SDPA_PORT = dict(heads=8, seq_len=4096, head_dim=32, world_size=4, seed=10)


def sdpa_port_inputs(batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SDPA_PORT["seed"])
    shape = (batch, SDPA_PORT["heads"], SDPA_PORT["seq_len"], SDPA_PORT["head_dim"])
    return [torch.rand(shape, generator=g) for _ in range(3)]


def sdpa_port_rank(rank: int, world_size: int, batch: int) -> tuple[torch.Tensor, ...]:
    layout = Layout("zigzag", world_size)
    local = [layout.shard(t, 2, rank).requires_grad_(True) for t in sdpa_port_inputs(batch)]
    out = ring_attention(*local, mask=MaskSpec(causal=True), layout=layout)
    out.sum().backward()
    return (out.detach(), *(t.grad for t in local))


def sdpa_port_one_device(batch: int) -> tuple[torch.Tensor, ...]:
    qkv = [t.requires_grad_(True) for t in sdpa_port_inputs(batch)]
    out = F.scaled_dot_product_attention(*qkv, is_causal=True)
    out.sum().backward()
    return (out.detach(), *(t.grad for t in qkv))
