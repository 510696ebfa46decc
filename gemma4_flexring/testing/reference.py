"""Dense float64 reference on the whole sequence, written straight from the mask formula.

Deliberately shares no code with the ring (no mask_mods of its own, no kernels): it is what tests
and the demo compare against. A FlexMask's mask_mod is the user's definition of the mask, so it
is evaluated here as is, on the whole grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..info import SequenceInfo
from ..planning.flexmask import FlexMask
from ..planning.masks import MaskSpec


def reference_mask(spec: MaskSpec | FlexMask, info: SequenceInfo | None, batch: int, seq_len: int) -> Tensor:
    """Allowed (query i, key j) pairs as bool [B, S, S]; a FlexMask's mask_mod is evaluated on
    the whole grid (its image blocks are ignored, documents and padding applied)."""
    i = torch.arange(seq_len).view(1, -1, 1)
    j = torch.arange(seq_len).view(1, 1, -1)
    doc = block = pad = None
    if info is not None:
        doc, block, pad = (None if t is None else t.cpu() for t in info.tensors())
    if isinstance(spec, FlexMask):
        mask_mod = spec.factory(**{k: t.cpu() for k, t in spec.tensors.items()})
        b = torch.arange(batch).view(-1, 1, 1)
        allowed = mask_mod(b, torch.zeros((), dtype=torch.int64), i, j).expand(batch, seq_len, seq_len)
    else:
        order = (j <= i) if spec.causal else torch.ones(1, seq_len, seq_len, dtype=torch.bool)
        if spec.block_bidirectional and block is not None:
            order = order | ((block[:, :, None] >= 0) & (block[:, :, None] == block[:, None, :]))
        allowed = order.expand(batch, seq_len, seq_len)
        if spec.sliding_window is not None:
            w = spec.sliding_window
            allowed = allowed & ((j > i - w) if spec.causal else ((i - j).abs() <= w))
    if doc is not None:
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    if pad is not None:
        allowed = allowed & ~pad[:, None, :]
    return allowed


def reference_attention(q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec | FlexMask, info: SequenceInfo | None = None,
                        scale: float | None = None) -> Tensor:
    """Whole-sequence attention in float64: q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, Hq, S, D].

    Rows with no allowed key return zeros. Differentiable (plain autograd).
    """
    batch, q_heads, seq_len, head_dim = q.shape
    groups = q_heads // k.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    k64 = k64.repeat_interleave(groups, dim=1)
    v64 = v64.repeat_interleave(groups, dim=1)
    allowed = reference_mask(spec, info, batch, seq_len).to(q.device).unsqueeze(1)
    scores = (q64 @ k64.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_alive = allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~row_alive, 0.0), dim=-1) * row_alive
    return probs @ v64


def reference_gradients(q: Tensor, k: Tensor, v: Tensor, grad: Tensor, spec: MaskSpec | FlexMask,
                        info: SequenceInfo | None = None, scale: float | None = None) -> list[Tensor]:
    """Float64 ``[out, dq, dk, dv]`` of ``reference_attention`` for the output gradient ``grad``
    [B, Hq, S, D] (q, k, v as there; their dtype is raised to float64 first)."""
    q, k, v = (t.detach().to(torch.float64).requires_grad_(True) for t in (q, k, v))
    out = reference_attention(q, k, v, spec, info, scale)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad.to(torch.float64))]
