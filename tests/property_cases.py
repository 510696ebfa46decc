"""Random ring problems for the property test, and the worker that runs a batch of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemma4_flexring import Layout, MaskSpec, SequenceInfo, ring_attention
from ring_cases import layout_of, planning_sizes


@dataclass
class Example:
    """One problem; the metadata tensors are whole-sequence [B, S] (None when absent)."""

    world_size: int
    layout: str
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    seq_len: int
    mask: MaskSpec
    document_ids: torch.Tensor | None
    block_ids: torch.Tensor | None
    padding: torch.Tensor | None
    scale: float | None
    block_size: int
    seed: int
    piece_rows: int | None = None  # the exchange's pieces (None: the package's)

    def info(self) -> SequenceInfo | None:
        if self.document_ids is None and self.block_ids is None and self.padding is None:
            return None
        return SequenceInfo(self.document_ids, self.block_ids, self.padding)

    def make_layout(self) -> Layout:
        """The example's layout; a balanced one is computed from its metadata."""
        return layout_of(self.layout, self.world_size, self.info(), self.batch, self.seq_len)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Whole-sequence float64 q, k, v and an output gradient."""
        g = torch.Generator().manual_seed(self.seed)
        b, s, d = self.batch, self.seq_len, self.head_dim
        heads = (self.q_heads, self.kv_heads, self.kv_heads, self.q_heads)
        return tuple(torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for h in heads)


def run_example(rank: int, world_size: int, example: Example) -> tuple[torch.Tensor, ...]:
    """This rank's (out, dq, dk, dv) of ``example``."""
    q, k, v, grad = example.tensors()
    layout = example.make_layout()
    local = [layout.shard(t, 2, rank).clone().requires_grad_(True) for t in (q, k, v)]
    with planning_sizes(example.block_size, example.piece_rows):
        out = ring_attention(*local, mask=example.mask, info=example.info(), layout=layout, scale=example.scale)
        out.backward(layout.shard(grad, 2, rank))
    return (out.detach(), *(t.grad for t in local))


def run_examples(rank: int, world_size: int, examples: list[Example]) -> list:
    return [run_example(rank, world_size, e) for e in examples]
