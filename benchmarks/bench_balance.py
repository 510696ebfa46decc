"""Per-rank balance of packed batches: zigzag, contiguous and balanced layouts side by side.

    python benchmarks/bench_balance.py [--world-size 2] [--seq-len 16384] [--mask causal] ...

Spawns P gloo ranks (one thread each, as bench_ring.py) and runs, for every packed case and every
layout, ring attention forward+backward on that rank's shard. Each rank measures its own CPU time
(``time.process_time``: waiting on a peer costs none, so a loaded machine blurs it less than wall
time); a figure is the median of ``--repeats`` steps after a warm-up that builds the plans.
The balance of a layout is max/mean of the per-rank times (1.00 is perfect); the step lasts
as long as its slowest rank. Planning time is the CPU time of one rank's plans against every
K/V owner, built afresh. The target (reported, not enforced): balanced <= 1.10 on every case.

Cases (documents as lengths, scaled to --seq-len; the last one takes what is left):
  long_tail:  one 14000-token document and a short tail
  long_four:  a 12000-token document and four short ones
  six_uneven: six uneven documents
  four_equal: four equal documents
  two_rows:   B=2, rows packed differently (long_tail and six_uneven)
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gemma4_flexring import Layout, MaskSpec, SequenceInfo, clear_mask_cache, ring_attention, schedule
from gemma4_flexring.metadata import describe

BASE = 16384
CASES = {
    "long_tail": [[14000]],
    "long_four": [[12000, 1100, 1500, 900]],
    "six_uneven": [[5000, 3000, 2500, 1884, 2500]],
    "four_equal": [[4096, 4096, 4096]],
    "two_rows": [[14000], [5000, 3000, 2500, 1884, 2500]],
}
MASKS = {"causal": MaskSpec(causal=True), "sliding": MaskSpec(causal=True, sliding_window=1024)}
LAYOUTS = ("zigzag", "contiguous", "balanced")
TARGET = 1.10


def document_ids(rows: list[list[int]], seq_len: int) -> torch.Tensor:
    """[B, S] document ids of documents with these lengths (at BASE tokens), scaled to ``seq_len``."""
    out = []
    for lengths in rows:
        cuts = [n * seq_len // BASE for n in lengths]
        cuts.append(seq_len - sum(cuts))
        out.append(torch.cat([torch.full((n,), i) for i, n in enumerate(cuts) if n > 0]))
    return torch.stack(out)


def make_layout(kind: str, info: SequenceInfo, world: int) -> Layout:
    return Layout.balanced(info, world) if kind == "balanced" else Layout(kind, world)


def planning_time(spec: MaskSpec, info: SequenceInfo, layout: Layout, seq_len: int, rank: int, world: int) -> float:
    """CPU seconds to plan ``rank`` against every K/V owner from scratch."""
    metadata = describe(*info.tensors()).effective(*info.tensors())
    start = time.process_time()
    for owner in range(world):
        schedule.plan_pair(spec, *metadata, layout, seq_len, rank, owner, info.padding.shape[0],
                           torch.float32, torch.device("cpu"))
    return time.process_time() - start


def run(rank: int, args, port: int, results) -> None:
    torch.set_num_threads(1)
    world = args.world_size
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    spec = MASKS[args.mask]
    for case in args.cases:
        docs = document_ids(CASES[case], args.seq_len)
        batch = docs.shape[0]
        info = SequenceInfo(document_ids=docs)
        g = torch.Generator().manual_seed(0)
        shape_q = (batch, args.heads, args.seq_len, args.head_dim)
        shape_kv = (batch, args.kv_heads, args.seq_len, args.head_dim)
        full = [torch.randn(s, generator=g) for s in (shape_q, shape_kv, shape_kv)]
        for kind in args.layouts:
            layout = make_layout(kind, info, world)
            q, k, v = (layout.shard(t, 2, rank).contiguous().requires_grad_(True) for t in full)

            def step():
                ring_attention(q, k, v, mask=spec, info=info, layout=layout).sum().backward()

            clear_mask_cache()
            step()  # warm-up: plans, allocator
            times = []
            for _ in range(args.repeats):
                if world > 1:
                    dist.barrier()
                start = time.process_time()
                step()
                times.append(time.process_time() - start)
            segments = len(layout.segments(args.seq_len, rank))
            plan = planning_time(spec, info, layout, args.seq_len, rank, world)
            results[case, kind, rank] = (statistics.median(times), segments, plan)
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--mask", choices=sorted(MASKS), default="causal")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    with mp.Manager() as manager:
        results = manager.dict()
        if args.world_size == 1:
            run(0, args, 0, results)
        else:
            mp.spawn(run, args=(args, _free_port(), results), nprocs=args.world_size)
        results = dict(results)

    p = args.world_size
    print(f"mask={args.mask} P={p} S={args.seq_len} H={args.heads}/{args.kv_heads} D={args.head_dim} "
          f"threads/rank=1, CPU time per rank, median of {args.repeats}")
    print(f"{'case':<11} " + " | ".join(f"{kind:>30}" for kind in args.layouts))
    print(f"{'':<11} " + " | ".join(f"{'max/mean  max ms  segs  plan ms':>30}" for _ in args.layouts))
    worst = 0.0
    for case in args.cases:
        cells = []
        for kind in args.layouts:
            times, segs, plans = zip(*(results[case, kind, r] for r in range(p)))
            ratio = max(times) / statistics.mean(times)
            if kind == "balanced":
                worst = max(worst, ratio)
            cells.append(f"{ratio:8.2f} {max(times) * 1e3:7.0f} {max(segs):5d} {max(plans) * 1e3:8.1f}")
        print(f"{case:<11} " + " | ".join(f"{c:>30}" for c in cells))
    if "balanced" in args.layouts:
        verdict = "meets" if worst <= TARGET else "misses"
        print(f"balanced: worst max/mean {worst:.2f} ({verdict} target <= {TARGET})")


if __name__ == "__main__":
    main()
