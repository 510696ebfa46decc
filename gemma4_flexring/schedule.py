"""Per-pair ring schedule: which tiles of (local queries x visiting key chunk) need a kernel.

At ring step ``s`` rank ``r`` holds the key/value chunk of rank ``(r - s) mod P``. A pair
(query rank, key rank) splits into segment pairs, one per (query segment, key segment) of the
layout, each globally contiguous on both sides. Each segment pair gets a flex ``BlockMask``,
built per step from the Gemma 4 ``mask_mod``, and its blocks decide the kernel calls (tiles):

- no allowed block                 -> skipped, no kernel call;
- every entry allowed              -> one unmasked call over the allowed blocks' span;
- the causal square                -> one call on the kernel's own causal path;
- otherwise, per row of q-blocks   -> one call per run of that row's blocks of one kind: an
                                      unmasked call over consecutive full blocks, a call with an
                                      additive mask over consecutive partial ones (consecutive rows
                                      with the same runs share calls). Masks thus cover partial
                                      blocks only: O(L x block), not L^2, for a sliding window,
                                      causal with padding, or packed documents.

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
ROW_CHUNK_BLOCKS = 16  # q-block rows whose dense mask planning evaluates at once


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
            if mask_mod is None:
                tiles.append(Tile(_rows(qs, 0, qs.length), _rows(ks, 0, ks.length), "full"))
                continue
            block_mask = segment_block_mask(mask_mod, qs, ks, batch, device, block_size)
            masks.append(block_mask)
            tiles.extend(plan_segments(block_mask, qs, ks, dtype))
    return PairPlan(tuple(tiles), tuple(masks))


def segment_block_mask(mask_mod: MaskMod, qs: Segment, ks: Segment, batch: int, device: torch.device,
                       block_size: int) -> BlockMask:
    """The BlockMask of query segment ``qs`` against key segment ``ks`` (its mask_mod in the
    segments' local indices). The dense mask is evaluated ``ROW_CHUNK_BLOCKS`` q-block rows at a
    time, so planning never holds a whole segment pair's [L, L] mask."""
    tile_mod = offset_mask_mod(mask_mod, qs.global_start, ks.global_start)
    chunk = block_size * ROW_CHUNK_BLOCKS
    flags = [block_flags(evaluate_mask(offset_mask_mod(tile_mod, start, 0), batch, min(chunk, qs.length - start),
                                       ks.length, device), block_size)
             for start in range(0, qs.length, chunk)]
    any_allowed = torch.cat([a for a, _ in flags], dim=2)
    all_allowed = torch.cat([a for _, a in flags], dim=2)
    return block_mask_from_flags(any_allowed, all_allowed, block_size, tile_mod, (qs.length, ks.length))


def plan_segments(block_mask: BlockMask, qs: Segment, ks: Segment, dtype: torch.dtype) -> list[Tile]:
    """The kernel calls of one segment pair, decided by its BlockMask's blocks (see the module doc).

    Dense masks are evaluated only where blocks are partial: diagonal blocks of a causal square,
    and the bands that need an additive mask.
    """
    used, full = block_flags_of(block_mask)
    if not used.any():
        return []
    q_size, kv_size = block_mask.BLOCK_SIZE
    (qb0, qb1), (kb0, kb1) = _index_span(used.any(1)), _index_span(used.any(0))
    q0, q1 = qb0 * q_size, min(qb1 * q_size, qs.length)
    k0, k1 = kb0 * kv_size, min(kb1 * kv_size, ks.length)
    if full[qb0:qb1, kb0:kb1].all():
        return [Tile(_rows(qs, q0, q1), _rows(ks, k0, k1), "full")]
    if qs == ks and (q0, q1) == (k0, k1) and _is_causal_square(block_mask, used, full, qb0, qb1, q_size, q1):
        return [Tile(_rows(qs, q0, q1), _rows(ks, k0, k1), "causal")]
    return [_band_tile(block_mask, qs, ks, rows, cols, is_full, dtype)
            for rows, runs in _bands(used, full, q_size, kv_size, qs, ks) for cols, is_full in runs]


def _is_causal_square(block_mask: BlockMask, used: Tensor, full: Tensor, b0: int, b1: int, size: int,
                      stop: int) -> bool:
    """Whether blocks [b0, b1) of a square on the diagonal hold exactly ``j <= i``: full below the
    diagonal, unused above it, lower-triangular diagonal blocks (checked densely, block by block)."""
    n = b1 - b0
    below = torch.ones(n, n, dtype=torch.bool, device=used.device).tril(-1)
    above = below.T
    if not (full[b0:b1, b0:b1][below].all() and not used[b0:b1, b0:b1][above].any()):
        return False
    for b in range(b0, b1):
        span = (b * size, min((b + 1) * size, stop))
        block = _region(block_mask, span, span)
        if not torch.equal(block, _lower_triangle(span[1] - span[0], block.device).expand_as(block)):
            return False
    return True


def _bands(used: Tensor, full: Tensor, q_size: int, kv_size: int, qs: Segment, ks: Segment):
    """(row span, runs) per run of consecutive q-block rows with the same runs, where a row's runs
    are its maximal stretches of used key blocks that are all full or all partial:
    [((kv start, kv stop), all full), ...]."""
    bands: list[list] = []
    for row in used.any(1).nonzero().flatten().tolist():
        rows = (row * q_size, min((row + 1) * q_size, qs.length))
        runs = [((b0 * kv_size, min(b1 * kv_size, ks.length)), is_full)
                for b0, b1, is_full in _runs(used[row], full[row])]
        if bands and bands[-1][1] == runs and bands[-1][0][1] == rows[0]:
            bands[-1][0] = (bands[-1][0][0], rows[1])
        else:
            bands.append([rows, runs])
    return bands


def _runs(used: Tensor, full: Tensor) -> list[tuple[int, int, bool]]:
    """Maximal [start, stop) stretches of used blocks of one kind (full or not) in a block row."""
    runs: list[tuple[int, int, bool]] = []
    for b, (is_used, is_full) in enumerate(zip(used.tolist(), full.tolist())):
        if not is_used:
            continue
        if runs and runs[-1][1] == b and runs[-1][2] == is_full:
            runs[-1] = (runs[-1][0], b + 1, is_full)
        else:
            runs.append((b, b + 1, is_full))
    return runs


def _band_tile(block_mask: BlockMask, qs: Segment, ks: Segment, rows: tuple[int, int], cols: tuple[int, int],
               is_full: bool, dtype: torch.dtype) -> Tile:
    """One call: unmasked over full blocks (or partial ones that turn out all allowed), else with
    an additive mask of just this region."""
    q_rows, kv_rows = _rows(qs, *rows), _rows(ks, *cols)
    if is_full:
        return Tile(q_rows, kv_rows, "full")
    region = _region(block_mask, rows, cols)
    if region.all():
        return Tile(q_rows, kv_rows, "full")
    bias = torch.zeros(region.shape, dtype=dtype, device=region.device).masked_fill_(~region, float("-inf"))
    dead = ~region.any(-1)
    return Tile(q_rows, kv_rows, "masked", bias, dead if dead.any() else None)


def _region(block_mask: BlockMask, rows: tuple[int, int], cols: tuple[int, int]) -> Tensor:
    """The BlockMask's mask_mod evaluated on rows x cols of its segment pair: bool [B, 1, r, c]."""
    num = block_mask.kv_num_blocks
    return evaluate_mask(offset_mask_mod(block_mask.mask_mod, rows[0], cols[0]), num.shape[0],
                         rows[1] - rows[0], cols[1] - cols[0], num.device)


def block_flags_of(block_mask: BlockMask) -> tuple[Tensor, Tensor]:
    """A BlockMask's blocks over every batch row and head: (used, full), bool [Qb, KVb].

    ``used``: partial or full in some row; ``full``: full in every row. Read from the sparse
    indices: ``to_dense`` uses vmap, which fails inside compiled graphs' runtime wrappers.
    """
    kv_blocks = block_mask.kv_indices.shape[-1]
    partial = _dense_flags(block_mask.kv_num_blocks, block_mask.kv_indices, kv_blocks).flatten(0, 1)
    full = _dense_flags(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, kv_blocks).flatten(0, 1)
    return (partial | full).any(0), full.all(0)


def _dense_flags(num: Tensor, idx: Tensor, kv_blocks: int) -> Tensor:
    """[B, H, Qb, KVb] flags from per-row counts [B, H, Qb] and index lists [B, H, Qb, KVb]."""
    valid = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
    target = torch.where(valid, idx.long(), kv_blocks)
    flags = torch.zeros(*num.shape, kv_blocks + 1, dtype=torch.bool, device=idx.device)
    return flags.scatter_(-1, target, True)[..., :kv_blocks]


def _rows(segment: Segment, start: int, stop: int) -> slice:
    """Local rows of ``segment``'s elements [start, stop)."""
    return slice(segment.local_start + start, segment.local_start + stop)


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


def _index_span(flags: Tensor) -> tuple[int, int]:
    """[first, last + 1) of the set entries of a 1-D flag vector (which has one)."""
    idx = flags.nonzero().flatten()
    return int(idx[0]), int(idx[-1]) + 1


def _lower_triangle(n: int, device: torch.device) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()
