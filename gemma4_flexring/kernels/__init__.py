"""Chunk kernels: attention of query rows against one key/value tile, returning the LSE.

A kernel implements ``ChunkKernel``; ``kernel_for(device)`` picks it. The ring never calls
a kernel for a skipped tile.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ..schedule import Tile
from .cpu import CpuFlashKernel


class ChunkKernel(Protocol):
    def forward(self, q: Tensor, k: Tensor, v: Tensor, tile: Tile, scale: float) -> tuple[Tensor, Tensor]:
        """q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> (out [B, Hq, Sq, D], lse [B, Hq, Sq], -inf for dead rows).

        out and lse may be wider than q's dtype (the ring accumulates in float32 or float64).
        """

    def backward(self, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 tile: Tile, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """This tile's share of (dq, dk, dv), given the *merged* out and lse of the full row.

        ``lse`` is float32 (float64 for float64 inputs); the shares may be wider than the inputs.
        """


_KERNELS: dict[str, ChunkKernel] = {"cpu": CpuFlashKernel()}


def kernel_for(device: torch.device) -> ChunkKernel | None:
    """The chunk kernel for ``device``'s type, or None when there is none."""
    return _KERNELS.get(device.type)


def supported_devices() -> tuple[str, ...]:
    return tuple(_KERNELS)
