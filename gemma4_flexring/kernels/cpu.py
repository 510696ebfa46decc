"""CPU chunk kernel: aten's flash attention for CPU, which returns the LSE and whose backward
takes the merged out and LSE, so each tile's gradient share needs no forward recompute."""

from __future__ import annotations

import torch
from torch import Tensor

_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


class CpuFlashKernel:
    """``ChunkKernel`` over aten's CPU flash attention (GQA native, any float dtype): one call per
    dense tile, so unmasked and causal tiles take the kernel's fast paths and additive masks
    cover partial blocks only."""

    name = "aten"
    devices = ("cpu",)

    def calls(self, plan) -> tuple:
        return plan.tiles

    def forward(self, q: Tensor, k: Tensor, v: Tensor, tile, scale: float) -> tuple[Tensor, Tensor]:
        out, lse = _forward(q, k, v, 0.0, tile.kind == "causal", attn_mask=tile.bias, scale=scale)
        if tile.dead_rows is not None:
            # The kernel reports lse = 0 for a row whose keys are all masked; it must weigh nothing.
            lse = lse.masked_fill(tile.dead_rows, float("-inf"))
        return out, lse

    def backward(self, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 tile, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        dq, dk, dv = _backward(grad_out, q, k, v, out, lse, 0.0, tile.kind == "causal",
                               attn_mask=tile.bias, scale=scale)
        return dq, dk, dv
