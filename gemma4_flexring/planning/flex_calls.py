"""The flex kernel's calls: per segment pair, one FlexAttention call per run of key blocks some
query sees, each with its ``BlockMask`` sliced from the pair's block flags.

Shape legend: B batch rows of the masks, H heads (1: no mask reads the head), Qb / KVb query /
key blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ..layout import Segment
from .masks import MaskMod, offset_mask_mod
from .rows import Rows, block_elements, merge_rows, runs, segment_rows

class SegmentPair(NamedTuple):
    """One flex call: a query segment against one run of key blocks of one key segment.

    Per (query segment, key segment), each run of key blocks that some query may see is one call
    (``block_pairs``); key blocks outside the runs are never read. ``q_rows`` is the whole query
    segment, ``kv_rows`` the run, whole blocks of its segment (local rows, rows of the visiting
    chunk). ``block_mask`` is the call's flex BlockMask over (q_rows, kv_rows), None when no mask
    applies; its mask_mod reads the rows' global offsets from 0-d tensors, so a compiled kernel
    sees the same closure structure for every call.
    """

    q_rows: slice
    kv_rows: slice
    block_mask: BlockMask | None


def block_pairs(any_allowed: Tensor, all_allowed: Tensor, mask_mod: MaskMod, qs: Segment, ks: Segment,
                block_size: int) -> list[SegmentPair]:
    """The flex calls of one segment pair (``SegmentPair``), from its block flags [B, Qb, KVb]
    (``all_allowed`` set on complete blocks only): one per run of key blocks with an allowed entry
    (``used_key_blocks``), over the whole query segment.

    Whole query segments keep the compiled flex calls' query shapes those of the layout's
    segments: cut to the query blocks a run serves, the calls took 15 + 17 forward + backward
    graphs against 12 + 14 (measured on the CPU with dynamo's compile counter, six masks at
    S=2048, P=4, contiguous operands, lone key blocks not widened). The query blocks a run does
    not serve cost the kernel nothing (no key block to visit).
    """
    calls = []
    for kb0, kb1 in used_key_blocks(any_allowed):
        k0, k1 = block_elements(ks, kb0, kb1, block_size)
        # Tensor offsets: a compiled flex guards on closure ints' values, not on tensors'.
        offsets = (torch.tensor(s.global_start + at, device=any_allowed.device) for s, at in ((qs, 0), (ks, k0)))
        some, every = (flags[:, None, :, kb0:kb1] for flags in (any_allowed, all_allowed))
        block_mask = block_mask_from_flags(some, every, block_size, offset_mask_mod(mask_mod, *offsets),
                                           (qs.length, k1 - k0))
        calls.append(SegmentPair(segment_rows(qs, 0, qs.length), segment_rows(ks, k0, k1), block_mask))
    return calls


def used_key_blocks(any_allowed: Tensor) -> Rows:
    """Runs [kb0, kb1) of the key blocks with an allowed entry for some query block and batch row,
    from block flags [B, Qb, KVb]. A run of one block takes a neighbour too (the next one, or the
    one before at the segment's end) when the segment has one: a compiled flex call specializes a
    block count of 1, so such calls compiled graphs of their own."""
    used = any_allowed.any(0).any(0)
    spans = [(kb0, kb1) for _, kb0, kb1, _ in runs(used.view(1, -1).to(torch.int8)).tolist()]
    count = used.numel()
    if count < 2:
        return tuple(spans)
    return merge_rows((a, a + 2) if b - a == 1 and b < count else (a - 1, b) if b - a == 1 else (a, b) for a, b in spans)


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
