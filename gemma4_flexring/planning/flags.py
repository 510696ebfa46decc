"""Exact block flags of one segment pair, from the mask's block classes and, inside partial
blocks only, the mask evaluated entry by entry.

Shape legend: B batch rows of the masks, Qb / KVb query / key blocks, n blocks evaluated.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .blocks import EMPTY, FULL, PARTIAL, Blocks
from .masks import Mask, MaskMod

DENSE_CHUNK = 1 << 22  # mask entries planning evaluates at once, bounding its memory


class Flags(NamedTuple):
    """Exact flags of one segment pair: ``any_allowed``/``all_allowed`` bool [B, Qb, KVb] per
    (query block, key block), and ``seen_keys`` bool [key segment length]: the keys that some
    query of the segment may see (in some batch row)."""

    any_allowed: Tensor
    all_allowed: Tensor
    seen_keys: Tensor


def segment_flags(mask: Mask, q: Blocks, k: Blocks, batch: int) -> Flags:
    """Exact flags of every (query block, key block) of one segment pair (see ``Flags``). "All"
    looks at the segments' entries only: a short last block whose entries are all allowed counts
    as all allowed.

    The segment pair is classified as one block first, then block by block; only blocks classed
    partial are evaluated densely (and may turn out empty or full). The seen keys come from the
    same evaluation: a key block full for some query block is seen whole, one partial for some
    is seen where its dense evaluation allows.
    """
    shape = (batch, q.count, k.count)
    if (mask.classify(q.as_one(), k.as_one()) == EMPTY).all():
        nothing = torch.zeros(shape, dtype=torch.bool, device=q.device)
        return Flags(nothing, nothing, torch.zeros(k.length, dtype=torch.bool, device=q.device))
    cls = mask.classify(q, k).expand(shape)
    any_allowed, all_allowed = cls != EMPTY, cls == FULL
    seen = all_allowed.flatten(0, 1).any(0).repeat_interleave(k.size)
    qb, kb = (cls == PARTIAL).any(0).nonzero(as_tuple=True)
    if qb.numel():
        any_allowed[:, qb, kb], all_allowed[:, qb, kb], key_rows = dense_block_flags(mask.mask_mod, q, k, qb, kb,
                                                                                      batch)
        seen.view(k.count, k.size).index_put_((kb,), key_rows, accumulate=True)
    return Flags(any_allowed, all_allowed, seen[:k.length])


def dense_block_flags(mask_mod: MaskMod, q: Blocks, k: Blocks, qb: Tensor, kb: Tensor,
                      batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """``mask_mod`` evaluated entry by entry on the blocks (qb[n], kb[n]): (any allowed, all
    allowed), bool [batch, n], over the blocks' entries only, and which keys of each block some
    query of it sees in some batch row, bool [n, k.size]. At most ``DENSE_CHUNK`` entries are
    evaluated at once."""
    (q_first, q_last), (k_first, k_last) = q.bounds(), k.bounds()
    q_idx, q_real = block_indices(q_first[qb], q_last[qb], q.size)
    k_idx, k_real = block_indices(k_first[kb], k_last[kb], k.size)
    step = max(1, DENSE_CHUNK // (batch * q.size * k.size))
    some, every, keys = [], [], []
    for n in range(0, qb.numel(), step):
        part = slice(n, n + step)
        allowed = evaluate_at(mask_mod, batch, q_idx[part, :, None], k_idx[part, None, :])
        real = q_real[part, :, None] & k_real[part, None, :]
        hit = allowed & real
        some.append(hit.flatten(2).any(-1))
        every.append((allowed | ~real).flatten(2).all(-1))
        keys.append(hit.any(0).any(1))
    return torch.cat(some, 1), torch.cat(every, 1), torch.cat(keys, 0)


def block_indices(first: Tensor, last: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Positions of blocks [first[n], last[n]] padded to ``size`` by repeating the last one, and
    which of them are real: int64 [n, size], bool [n, size]."""
    idx = first[:, None] + torch.arange(size, device=first.device)
    return torch.minimum(idx, last[:, None]), idx <= last[:, None]


def evaluate_mask(mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """``mask_mod`` on every (b, q, kv) of a q_len x kv_len grid: bool [batch, 1, q_len, kv_len]."""
    q_idx = torch.arange(q_len, device=device).view(1, -1, 1)
    kv_idx = torch.arange(kv_len, device=device).view(1, 1, -1)
    return evaluate_at(mask_mod, batch, q_idx, kv_idx)


def evaluate_at(mask_mod: MaskMod, batch: int, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """``mask_mod`` at index grids that broadcast to [n, Q, KV], for every batch row: bool
    [batch, n, Q, KV] (the grids' leading dim stands in flex's head dim, which no mask reads).

    Broadcasting instead of flex's vmap: vmap fails inside a compiled graph's runtime wrappers.
    """
    b = torch.arange(batch, device=q_idx.device).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=q_idx.device)
    shape = torch.broadcast_shapes(q_idx.shape, kv_idx.shape)
    return mask_mod(b, h, q_idx.unsqueeze(0), kv_idx.unsqueeze(0)).expand(batch, *shape)
