"""Per-pair ring schedule: which tiles of (local queries x visiting key chunk) need a kernel.

At ring step ``s`` rank ``r`` holds the key/value chunk of rank ``(r - s) mod P``. A pair
(query rank, key rank) splits into tiles, one per (query segment, key segment) of the layout,
each globally contiguous on both sides. A tile's flex ``BlockMask`` decides, block by block:

- no allowed block              -> the tile is skipped, no kernel call;
- every allowed block is full   -> plain kernel, no mask;
- the tile is the causal square -> the kernel's own causal path;
- otherwise                     -> the kernel with an additive mask, cropped to the rows and
                                   columns that hold allowed blocks.

Every rank derives every plan from the same global metadata, so all ranks agree on them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .layout import Layout, Segment
from .masks import MaskMod, offset_mask_mod

BLOCK_SIZE = 128


def ring_owner(rank: int, step: int, world_size: int) -> int:
    """Rank whose key/value chunk ``rank`` holds at ring ``step``."""
    return (rank - step) % world_size


class Tile(NamedTuple):
    """One kernel call: local query rows against rows of the visiting chunk.

    ``bias`` is the additive 0/-inf mask [B or 1, 1, q_rows, kv_rows] for kind "masked";
    ``dead_rows`` [B or 1, 1, q_rows] marks queries with no allowed key in this tile.
    """

    q_rows: slice
    kv_rows: slice
    kind: str  # "full" | "causal" | "masked"
    bias: Tensor | None = None
    dead_rows: Tensor | None = None


class PairPlan(NamedTuple):
    """The tiles of one (query rank, key rank) pair and the block masks they came from."""

    tiles: tuple[Tile, ...]
    block_masks: tuple[BlockMask, ...]


def plan_pair(mask_mod: MaskMod | None, layout: Layout, seq_len: int, q_rank: int, kv_rank: int,
              batch: int, dtype: torch.dtype, device: torch.device,
              block_size: int | None = None) -> PairPlan:
    """Plan every tile of the pair; ``batch`` is the mask's batch (1 when it has no per-row data)."""
    block_size = BLOCK_SIZE if block_size is None else block_size
    tiles, masks = [], []
    for qs in layout.segments(seq_len, q_rank):
        for ks in layout.segments(seq_len, kv_rank):
            block_mask, tile = plan_tile(mask_mod, qs, ks, batch, dtype, device, block_size)
            if block_mask is not None:
                masks.append(block_mask)
            if tile is not None:
                tiles.append(tile)
    return PairPlan(tuple(tiles), tuple(masks))


def plan_tile(mask_mod: MaskMod | None, qs: Segment, ks: Segment, batch: int, dtype: torch.dtype,
              device: torch.device, block_size: int) -> tuple[BlockMask | None, Tile | None]:
    """Block mask and tile (None when skipped) of query segment ``qs`` against key segment ``ks``."""
    q_all = slice(qs.local_start, qs.local_start + qs.length)
    kv_all = slice(ks.local_start, ks.local_start + ks.length)
    if mask_mod is None:
        return None, Tile(q_all, kv_all, "full")
    tile_mod = offset_mask_mod(mask_mod, qs.global_start, ks.global_start)
    allowed = evaluate_mask(tile_mod, batch, qs.length, ks.length, device)
    any_allowed, all_allowed = block_flags(allowed, block_size)
    block_mask = block_mask_from_flags(any_allowed, all_allowed, block_size, tile_mod, allowed.shape[-2:])
    used = any_allowed.any(1).any(0)  # [q_blocks, kv_blocks], union over batch
    if not used.any():
        return block_mask, None
    q0, q1 = _block_span(used.any(1), block_size, qs.length)
    k0, k1 = _block_span(used.any(0), block_size, ks.length)
    q_rows = slice(qs.local_start + q0, qs.local_start + q1)
    kv_rows = slice(ks.local_start + k0, ks.local_start + k1)
    allowed = allowed[:, :, q0:q1, k0:k1]
    if allowed.all():
        return block_mask, Tile(q_rows, kv_rows, "full")
    on_diagonal = qs.global_start + q0 == ks.global_start + k0 and q1 - q0 == k1 - k0
    if on_diagonal and torch.equal(allowed, _lower_triangle(q1 - q0, device).expand_as(allowed)):
        return block_mask, Tile(q_rows, kv_rows, "causal")
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    dead = ~allowed.any(-1)
    return block_mask, Tile(q_rows, kv_rows, "masked", bias, dead if dead.any() else None)


def evaluate_mask(mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """``mask_mod`` on every (b, q, kv) by broadcasting: bool [batch, 1, q_len, kv_len].

    Broadcasting instead of flex's vmap: vmap fails inside a compiled graph's runtime wrappers.
    """
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q_idx = torch.arange(q_len, device=device).view(1, 1, -1, 1)
    kv_idx = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    return mask_mod(b, h, q_idx, kv_idx).expand(batch, 1, q_len, kv_len)


def block_flags(allowed: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Per block of a dense bool mask [B, H, Q, KV]: (any allowed, all allowed), [B, H, Qb, KVb].

    Blocks overhanging the end count the overhang as masked, as ``create_block_mask`` does.
    """
    batch, heads, q_len, kv_len = allowed.shape
    q_blocks, kv_blocks = -(-q_len // block_size), -(-kv_len // block_size)
    padded = allowed.new_zeros(batch, heads, q_blocks * block_size, kv_blocks * block_size)
    padded[:, :, :q_len, :kv_len] = allowed
    blocks = padded.view(batch, heads, q_blocks, block_size, kv_blocks, block_size)
    return blocks.any(5).any(3), blocks.all(5).all(3)


def block_mask_from_flags(any_allowed: Tensor, all_allowed: Tensor, block_size: int, mask_mod: MaskMod,
                          seq_lengths: tuple[int, int]) -> BlockMask:
    """The flex BlockMask with these block flags, as ``create_block_mask`` would build it."""
    partial, full = any_allowed & ~all_allowed, all_allowed
    kv_num, kv_idx = _sparse_rows(partial)
    full_kv_num, full_kv_idx = _sparse_rows(full)
    q_num, q_idx = _sparse_rows(partial.transpose(-1, -2))
    full_q_num, full_q_idx = _sparse_rows(full.transpose(-1, -2))
    return BlockMask(seq_lengths=tuple(seq_lengths), kv_num_blocks=kv_num, kv_indices=kv_idx,
                     full_kv_num_blocks=full_kv_num, full_kv_indices=full_kv_idx,
                     q_num_blocks=q_num, q_indices=q_idx, full_q_num_blocks=full_q_num,
                     full_q_indices=full_q_idx, BLOCK_SIZE=(block_size, block_size), mask_mod=mask_mod)


def _sparse_rows(flags: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of block flags [B, H, Qb, KVb]: how many are set, and their indices first."""
    num = flags.sum(-1, dtype=torch.int32)
    idx = flags.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx


def _block_span(used: Tensor, block_size: int, length: int) -> tuple[int, int]:
    """[start, stop) element span covering the used blocks of a 1-D block flag vector."""
    idx = used.nonzero().flatten()
    return int(idx[0]) * block_size, min(int(idx[-1] + 1) * block_size, length)


def _lower_triangle(n: int, device: torch.device) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()
