"""FlexMasks at scale: what planning a batch costs (the mask_mod evaluated entry by entry) next to
the equivalent ``MaskSpec`` (planned from block summaries), and the bytes each rank sends against
the rows its mask needs.

    python benchmarks/bench_flexmask.py [--world-size 4] [--seq-len 16384] [--layout zigzag] [--document 3000] \
        [--unclassed]

Every rank (a gloo process) runs one packed row [1, S] (documents of ``--document`` tokens, 0:
one document) through each
mask: the presets (causal, sliding window W=512, Llama 4 chunks of 2048, prefix-LM 4096 per
document... see ``MASKS``), and for the first two their ``MaskSpec`` twin. For each it times the
op's preparation of a new batch (plans, exchange schedule, agreement: everything before the first
exchange, plan cache emptied first; CPU seconds of the rank's own thread), then runs one forward
and backward (H=1, D=16, float32) and counts the bytes it sent. The bound: the rows of other
ranks' chunks that some local query may see, sent three times (K/V forward, K/V backward, dK/dV
home), counted by evaluating the mask densely apart from the planner. Target: sent / bound <= 1.25.
With ``--unclassed`` the presets' mask_mods lose their ``block_classes``, as a mask_mod a user
writes has none: the planner then evaluates every block the documents leave open.
"""

from __future__ import annotations

import argparse
import time

import torch

from gemma4_flexring import (FlexMask, Layout, MaskSpec, SequenceInfo, clear_mask_cache, presets, reset_ring_stats,
                             ring_attention, ring_stats)
from gemma4_flexring.prepare import RingArgs, mask_arguments, prepare
from gemma4_flexring.testing.launch import spawn

TARGET = 1.25


def preset(factory, classed: bool, **tensors) -> FlexMask:
    """A preset's FlexMask; not ``classed``: its mask_mod stripped of ``block_classes`` (as a
    user's mask_mod), under a name registered in this process."""
    if classed:
        return FlexMask(factory, **tensors)

    def unclassed(**args):
        inner = factory(**args)
        return lambda b, h, q_idx, kv_idx: inner(b, h, q_idx, kv_idx)

    return FlexMask(unclassed, name=f"bench_flexmask.unclassed.{factory.__name__}", **tensors)


def masks(info: SequenceInfo, classed: bool) -> dict[str, object]:
    """The benchmark's masks by name: FlexMask presets and two MaskSpec twins."""
    seq_len = info.document_ids.shape[1]
    is_global = torch.zeros(1, seq_len, dtype=torch.bool)
    is_global[0, ::seq_len // 16] = True
    return {
        "causal (MaskSpec)": MaskSpec(),
        "causal": preset(presets.causal, classed),
        "sliding 512 (MaskSpec)": MaskSpec(sliding_window=513),  # the preset's window w holds w + 1 keys
        "sliding 512": preset(presets.sliding_window, classed, window=torch.tensor(512)),
        "chunked 2048": preset(presets.chunked, classed, chunk=torch.tensor(2048)),
        "prefix-LM 512 per document": preset(presets.prefix_lm, classed, prefix=torch.tensor(512),
                                             document_ids=info.document_ids),
        "global 16 + sliding 512": preset(presets.global_tokens, classed, is_global=is_global,
                                          window=torch.tensor(512)),
        "dilated 512 / 4": preset(presets.dilated_sliding_window, classed, window=torch.tensor(512),
                                  dilation=torch.tensor(4)),
    }


def packed(seq_len: int, document: int) -> SequenceInfo:
    """One row [1, S] of documents of ``document`` tokens (0: one document)."""
    return SequenceInfo(document_ids=(torch.arange(seq_len) // (document or seq_len)).view(1, -1))


def needed_rows(mask, info: SequenceInfo, layout: Layout, seq_len: int, rank: int) -> int:
    """Rows of other ranks' chunks that some query of ``rank`` may see, from the dense mask,
    evaluated 1024 query rows at a time."""
    positions = layout.positions(seq_len, rank)
    seen = torch.zeros(seq_len, dtype=torch.bool)
    for start in range(0, positions.numel(), 1024):
        rows = positions[start:start + 1024]
        seen |= _rows_of(mask, info, seq_len, rows).any(0).any(0)
    seen[positions] = False
    return int(seen.sum())


def _rows_of(mask, info: SequenceInfo, seq_len: int, rows: torch.Tensor) -> torch.Tensor:
    """The dense mask at query ``rows``: bool [1, len(rows), S]."""
    doc = info.document_ids[0]
    i, j = rows.view(1, -1, 1), torch.arange(seq_len).view(1, 1, -1)
    if isinstance(mask, FlexMask):
        mask_mod = mask.factory(**mask.tensors)
        allowed = mask_mod(torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros((), dtype=torch.long), i, j)
    else:
        allowed = (j <= i) & ((j > i - mask.sliding_window) if mask.sliding_window else True)
    return allowed & (doc[rows].view(1, -1, 1) == doc.view(1, 1, -1))


def run_rank(rank: int, world_size: int, seq_len: int, layout_kind: str, document: int, classed: bool
             ) -> dict[str, tuple[float, int, int]]:
    """Per mask: (planning CPU seconds of a new batch, bytes sent in one forward + backward, bound)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    layout = Layout(layout_kind, world_size)
    info = packed(seq_len, document)
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, 1, seq_len // world_size, 16, generator=g).requires_grad_(True) for _ in range(3))
    table = layout.table(seq_len)
    results = {}
    for name, mask in masks(info, classed).items():
        clear_mask_cache()
        dist.barrier()
        cpu = time.thread_time()
        prepare(RingArgs(q, k, v, info.generation, *info.tensors(), table, group_name=dist.group.WORLD.group_name,
                         scale=None, kernel_name="", **mask_arguments(mask, q.device)), check=True)
        planning = time.thread_time() - cpu
        reset_ring_stats()
        out = ring_attention(q, k, v, mask=mask, info=info, layout=layout)
        out.sum().backward()
        row_bytes = 2 * k.shape[1] * k.shape[3] * k.element_size()
        bound = 3 * row_bytes * needed_rows(mask, info, layout, seq_len, rank)
        results[name] = (planning, ring_stats().bytes_sent, bound)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"])
    parser.add_argument("--document", type=int, default=3000)
    parser.add_argument("--unclassed", action="store_true", help="the presets without their block classes")
    args = parser.parse_args()
    ranks = spawn(run_rank, args.world_size, args.seq_len, args.layout, args.document, not args.unclassed)
    print(f"P={args.world_size} S={args.seq_len} {args.layout}, one row, documents of {args.document or args.seq_len}; "
          f"planning: worst rank's CPU for a new batch; bytes: all ranks' sent / all ranks' bound")
    print(f"  {'mask':30s} {'planning':>10s} {'sent/bound':>10s}")
    for name in ranks[0]:
        planning = max(r[name][0] for r in ranks)
        sent, bound = sum(r[name][1] for r in ranks), sum(r[name][2] for r in ranks)
        shown = f"{sent / bound:10.3f}" if bound else f"{'0 / 0' if sent == 0 else f'{sent} / 0':>10s}"
        verdict = "OK" if (sent <= TARGET * bound) else "MISSED"
        print(f"  {name:30s} {planning * 1e3:8.0f} ms {shown}  (target <= {TARGET}: {verdict})")


if __name__ == "__main__":
    main()
