"""A small Gemma 4 text attention layer on ``ring_attention``, for tests and the CLI.

Shape legend: B batch rows, L this rank's tokens (in layout order), H heads, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..api import ring_attention
from ..info import SequenceInfo
from ..layout import Layout
from ..planning.masks import MaskSpec
from .cases import make_info


class RMSNorm(nn.Module):
    """Gemma 4's RMSNorm: computed in float32, optional learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()
        y = y * torch.pow(y.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.type_as(x)


def _rotate_half(x: Tensor) -> Tensor:
    """Rotary's pairing of the head dim: ``[x1, x2] -> [-x2, x1]`` (x: [..., D], D even)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Gemma4Attention(nn.Module):
    """A small Gemma 4 text attention layer on ``ring_attention``.

    Projections, QK-norm and a scale-free V-norm, rotary embeddings on the given (global)
    positions, score scale 1.0, GQA, and the layer's mask: sliding (window ``sliding_window``,
    image blocks bidirectional) or global (causal).

    Shapes: ``hidden`` [B, L, hidden_size] (this rank's tokens in layout order),
    ``position_ids`` [B, L] global positions (default ``0..L-1``), returns [B, L, hidden_size].
    """

    def __init__(self, hidden_size: int = 32, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 8,
                 sliding_window: int | None = 8, rope_theta: float = 10000.0) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.mask = MaskSpec(causal=True, sliding_window=sliding_window,
                             block_bidirectional=sliding_window is not None)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.v_norm = RMSNorm(head_dim, with_scale=False)
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, hidden: Tensor, position_ids: Tensor | None = None, info: SequenceInfo | None = None,
                layout: Layout | None = None, group=None) -> Tensor:
        batch, length, _ = hidden.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=hidden.device).expand(batch, length)
        angles = position_ids[..., None].float() * self.inv_freq  # [B, L, D/2]
        angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # [B, L, 1, D]
        cos, sin = angles.cos().to(hidden.dtype), angles.sin().to(hidden.dtype)

        def heads(proj: nn.Linear, count: int) -> Tensor:
            return proj(hidden).view(batch, length, count, self.head_dim)

        q = self.q_norm(heads(self.q_proj, self.num_heads))
        k = self.k_norm(heads(self.k_proj, self.num_kv_heads))
        v = self.v_norm(heads(self.v_proj, self.num_kv_heads))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = ring_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=self.mask,
                             info=info, layout=layout, group=group, scale=1.0)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


def example() -> tuple[Gemma4Attention, list[tuple[tuple, dict]]]:
    """The built-in example of ``python -m gemma4_flexring graph`` (a factory, see ``tools/graph.py``).

    A sliding layer (window 8) and four batches of two rows (the catalog's metadata): 16 and 24
    tokens with packed documents, image blocks and padding, 20 tokens with padding only (another
    metadata pattern, same compiled code), then 20 tokens with no SequenceInfo at all (a new
    argument type: dynamo recompiles).
    """
    torch.manual_seed(0)
    layer = Gemma4Attention()

    def batch(seq_len: int, kind: str) -> tuple[tuple, dict]:
        return (torch.randn(2, seq_len, 32),), {"info": make_info(kind, 2, seq_len)}

    return layer, [batch(16, "all"), batch(24, "all"), batch(20, "padding"), batch(20, "none")]
