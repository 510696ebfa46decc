"""What ``bench`` measures besides time: a mask's allowed pairs and the traffic bound of a rank,
counted independently of the planner's plans, and peak memory within a block of code.

Shape legend: B batch rows, S whole sequence length.
"""

from __future__ import annotations

import torch

from ..info import SequenceInfo
from ..layout import Layout
from ..planning.blocks import EMPTY, FULL, PARTIAL, Blocks
from ..planning.flags import DENSE_CHUNK, block_indices, evaluate_at
from ..planning.masks import MaskSpec, gemma4_mask
from ..planning.metadata import informative


def mask_figures(spec: MaskSpec, info: SequenceInfo, layout: Layout, seq_len: int, rank: int,
                 block: int = 128) -> tuple[int, int]:
    """(allowed (query, key) pairs of ``rank``'s queries summed over the batch, rows of other ranks'
    chunks that some local query may see), exactly: full blocks counted whole, partial ones evaluated."""
    metadata = informative(*info.tensors())
    batch = info.tensors()[0].shape[0]
    mask = gemma4_mask(spec, *metadata)
    pairs, seen_rows = 0, 0
    for owner in range(layout.world_size):
        for ks in layout.segments(seq_len, owner):
            seen = torch.zeros(ks.length, dtype=torch.bool)
            kb = Blocks(ks.global_start, ks.length, block, torch.device("cpu"))
            k_first, k_last = kb.bounds()
            k_size = k_last - k_first + 1
            for qs in layout.segments(seq_len, rank):
                if mask is None:
                    pairs += batch * qs.length * ks.length
                    seen[:] = True
                    continue
                qb = Blocks(qs.global_start, qs.length, block, torch.device("cpu"))
                if (mask.classify(qb.as_one(), kb.as_one()) == EMPTY).all():
                    continue
                q_first, q_last = qb.bounds()
                cls = mask.classify(qb, kb).expand(batch, qb.count, kb.count)
                full = cls == FULL
                pairs += int((full.sum(0) * (q_last - q_first + 1)[:, None] * k_size[None, :]).sum())
                for b in full.any(0).any(0).nonzero().flatten().tolist():
                    seen[b * block:(b + 1) * block] = True
                partial = cls == PARTIAL
                qi, ki = partial.any(0).nonzero(as_tuple=True)
                step = max(1, DENSE_CHUNK // (batch * block * block))
                for n in range(0, qi.numel(), step):
                    q_idx, q_real = block_indices(q_first[qi[n:n + step]], q_last[qi[n:n + step]], block)
                    k_idx, k_real = block_indices(k_first[ki[n:n + step]], k_last[ki[n:n + step]], block)
                    allowed = evaluate_at(mask.mask_mod, batch, q_idx[:, :, None], k_idx[:, None, :])
                    allowed = allowed & (q_real[:, :, None] & k_real[:, None, :])
                    allowed = allowed & partial[:, qi[n:n + step], ki[n:n + step], None, None]
                    pairs += int(allowed.sum())
                    rows = (k_idx - ks.global_start)[allowed.any(0).any(1)]
                    seen[rows] = True
            if owner != rank:
                seen_rows += int(seen.sum())
    return pairs, seen_rows


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Peak resident-memory growth of this process within a ``with`` block (bytes): the peak of
    live memory in a process started with ``MALLOC_MMAP_THRESHOLD_`` fixed (``MEMORY_ENV``)."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        self.base = _rss("VmRSS")
        return self

    def __exit__(self, *exc):
        self.growth = _rss("VmHWM") - self.base


class PeakCuda:
    """Peak growth of the CUDA allocator's memory within a ``with`` block (bytes)."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.growth = torch.cuda.max_memory_allocated() - self.base


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)
