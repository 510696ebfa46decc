"""Exact block flags of one segment pair, from the mask's block classes and, inside partial
blocks only, the mask evaluated entry by entry (kept, as ``Evaluated``, for the tiles).

Shape legend: B batch rows of the masks, Qb / KVb query / key blocks, n blocks evaluated.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .blocks import EMPTY, FULL, PARTIAL, Blocks
from .masks import Mask, MaskMod

# Mask entries planning evaluates at once, bounding the evaluation's temporaries; the entries kept
# (``Evaluated``, a bool each) cover the partial blocks, which the plan's additive masks cover too.
DENSE_CHUNK = 1 << 22


class Flags(NamedTuple):
    """Exact flags of one segment pair: ``any_allowed``/``all_allowed`` bool [B, Qb, KVb] per
    (query block, key block), and ``seen_keys`` bool [key segment length]: the keys that some
    query of the segment may see (in some batch row)."""

    any_allowed: Tensor
    all_allowed: Tensor
    seen_keys: Tensor


class Evaluated(NamedTuple):
    """One segment pair's mask entry by entry, as planning found it: the blocks it evaluated
    densely (those partial in some batch row) kept, the others known from their classes (empty
    or full in each row). Read back for the tiles' additive masks and causal checks, so no entry
    is evaluated twice.

    Attributes:
        classes: int8 [B, Qb, KVb], the blocks' classes.
        index: int64 [Qb, KVb], each block's place in ``dense``, -1 when not evaluated.
        dense: bool [B, n, q.size, k.size], the evaluated blocks' entries; positions past a short
            last block repeat its last one (``block_indices``).
    """

    classes: Tensor
    index: Tensor
    dense: Tensor

    def entries(self, qb: Tensor, kb: Tensor) -> Tensor:
        """The entries of the blocks (qb[m], kb[m]) (int64 [m] each): bool [B, m, q.size, k.size],
        laid out as ``dense``."""
        q_size, k_size = self.dense.shape[-2:]
        out = (self.classes[:, qb, kb] == FULL)[:, :, None, None].repeat(1, 1, q_size, k_size)
        idx = self.index[qb, kb]
        evaluated = idx >= 0
        out[:, evaluated] = self.dense[:, idx[evaluated]]
        return out

    def region(self, rows: tuple[int, int], cols: tuple[int, int], q_len: int, k_len: int) -> Tensor:
        """The entries of blocks [rows) x [cols), cut to their first ``q_len`` x ``k_len``
        (a short last block's real ones): bool [B, 1, q_len, k_len]."""
        r, c = torch.arange(*rows, device=self.index.device), torch.arange(*cols, device=self.index.device)
        blocks = self.entries(r.repeat_interleave(c.numel()), c.repeat(r.numel()))  # [B, nr * nc, qs, ks]
        batch, _, q_size, k_size = blocks.shape
        grid = blocks.view(batch, r.numel(), c.numel(), q_size, k_size).transpose(2, 3)
        return grid.reshape(batch, r.numel() * q_size, c.numel() * k_size)[:, None, :q_len, :k_len]


def segment_flags(mask: Mask, q: Blocks, k: Blocks, batch: int) -> Flags:
    """Exact flags of every (query block, key block) of one segment pair (see ``Flags``). "All"
    looks at the segments' entries only: a short last block whose entries are all allowed counts
    as all allowed.

    The segment pair is classified block by block (``plan.live_segment_pairs`` leaves out, all at
    once, the segment pairs classed empty as a whole); only blocks classed partial are evaluated
    densely (and may turn out empty or full). The seen keys come from the
    same evaluation: a key block full for some query block is seen whole, one partial for some
    is seen where its dense evaluation allows.
    """
    return segment_evaluation(mask, q, k, batch)[0]


def segment_evaluation(mask: Mask, q: Blocks, k: Blocks, batch: int) -> tuple[Flags, Evaluated]:
    """``segment_flags``, and what was evaluated to find them (``Evaluated``)."""
    shape = (batch, q.count, k.count)
    cls = mask.classify(q, k).expand(shape)
    any_allowed, all_allowed = cls != EMPTY, cls == FULL
    seen = all_allowed.flatten(0, 1).any(0).repeat_interleave(k.size)
    qb, kb = (cls == PARTIAL).any(0).nonzero(as_tuple=True)
    index = torch.full(shape[1:], -1, dtype=torch.int64, device=q.device)
    dense = torch.zeros(batch, 0, q.size, k.size, dtype=torch.bool, device=q.device)
    if qb.numel():
        any_allowed[:, qb, kb], all_allowed[:, qb, kb], key_rows, dense = dense_block_flags(mask.mask_mod, q, k, qb,
                                                                                             kb, batch)
        seen.view(k.count, k.size).index_put_((kb,), key_rows, accumulate=True)
        index[qb, kb] = torch.arange(qb.numel(), device=q.device)
    return Flags(any_allowed, all_allowed, seen[:k.length]), Evaluated(cls, index, dense)


def dense_block_flags(mask_mod: MaskMod, q: Blocks, k: Blocks, qb: Tensor, kb: Tensor,
                      batch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``mask_mod`` evaluated entry by entry on the blocks (qb[n], kb[n]): (any allowed, all
    allowed), bool [batch, n], over the blocks' entries only; which keys of each block some
    query of it sees in some batch row, bool [n, k.size]; and the entries, bool [batch, n, q.size,
    k.size] (positions past a short last block repeat its last one). At most ``DENSE_CHUNK``
    entries are evaluated at once."""
    (q_first, q_last), (k_first, k_last) = q.bounds(), k.bounds()
    q_idx, q_real = block_indices(q_first[qb], q_last[qb], q.size)
    k_idx, k_real = block_indices(k_first[kb], k_last[kb], k.size)
    whole = q.length % q.size == 0 and k.length % k.size == 0  # every entry is real
    step = max(1, DENSE_CHUNK // (batch * q.size * k.size))
    some, every, keys, dense = [], [], [], []
    for n in range(0, qb.numel(), step):
        part = slice(n, n + step)
        allowed = evaluate_at(mask_mod, batch, q_idx[part, :, None], k_idx[part, None, :])
        real = None if whole else q_real[part, :, None] & k_real[part, None, :]
        hit = allowed if real is None else allowed & real
        seen = hit.any(2)  # [batch, n, k.size]: one pass over the entries serves `some` and `keys`
        some.append(seen.any(-1))
        every.append((allowed if real is None else allowed | ~real).flatten(2).all(-1))
        keys.append(seen.any(0))
        dense.append(allowed)
    return torch.cat(some, 1), torch.cat(every, 1), torch.cat(keys, 0), torch.cat(dense, 1)


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
