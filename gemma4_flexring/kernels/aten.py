"""The aten chunk kernel: aten's flash attention for CPU, which returns the LSE and whose backward
takes the merged out and LSE, so each tile's gradient share needs no forward recompute."""

from __future__ import annotations

import torch
from torch import Tensor

from ..planning.plan import CallPlan, PairPlan
from ..planning.tiles import TileKind

_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def backward_dtype(dtype: torch.dtype) -> torch.dtype:
    """The backward computes tiles of float16/bfloat16 inputs in float32, others in their own dtype.

    The kernel returns dq/dk/dv in its inputs' dtype: in bfloat16 every tile's share would be
    rounded before the ring adds the shares up, where one device rounds once (measured: dv up to
    2x one device's max error). In float32 the ring rounds once, at the end, as one device does;
    it costs time: the float32 backward takes 1.4-1.5x the bfloat16 one on this CPU (causal,
    S=4096, H=8/2, D=64, one or two threads). The forward keeps the inputs' dtype: in
    float32 it was 2.7x slower (bfloat16 runs on AMX), and its one extra rounding per tile leaves
    ``out`` within 1.15x of one device's mean error (1.5x max) in tests/test_numerics.py. K/V
    travel in their own dtype; the ring converts (``backward_operands``) a row group's query rows
    once for the group's calls, and each piece's K/V rows once for the piece's calls. A call that
    is its rows' and keys' only contributor (``exchange.split_alone``; P=1 causal is one) needs
    no sum: the ring runs it on the inputs as they are, in bfloat16, as one device does.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class AtenKernel:
    """``ChunkKernel`` over aten's CPU flash attention (GQA native, any float dtype): one call per
    dense tile, so unmasked and causal tiles take the kernel's fast paths and additive masks
    cover partial blocks only. The backward returns float32 shares for float16/bfloat16 inputs
    (see ``backward_dtype``)."""

    name = "aten"
    devices = ("cpu",)
    reads_whole_blocks = False

    def view(self, plan: PairPlan) -> CallPlan:
        """The dense tiles, and exactly the key rows they read."""
        return CallPlan(plan.tiles, plan.kv_rows)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, tile, scale: float) -> tuple[Tensor, Tensor]:
        out, lse = _forward(q, k, v, 0.0, tile.kind is TileKind.CAUSAL, attn_mask=tile.bias, scale=scale)
        if tile.dead_rows is not None:
            # The kernel reports lse = 0 for a row whose keys are all masked; it must weigh nothing.
            lse = lse.masked_fill(tile.dead_rows, float("-inf"))
        return out, lse

    def backward_operands(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.to(backward_dtype(t.dtype)) for t in tensors)

    def backward(self, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 tile, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        # The operands come from ``backward_operands``; the tile's mask is in the queries' dtype.
        return _backward(grad_out, q, k, v, out, lse, 0.0, tile.kind is TileKind.CAUSAL,
                         attn_mask=_bias(tile, q.dtype), scale=scale)


def _bias(tile, dtype: torch.dtype) -> Tensor | None:
    """The tile's additive mask in ``dtype`` (0/-inf convert exactly). Kept in the queries' dtype
    in the plans, whose masks are O(L x block) and may outweigh the K/V of few small heads."""
    return None if tile.bias is None else tile.bias.to(dtype)
