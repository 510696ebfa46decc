"""Planning time of one rank's pair plans (one per K/V owner), as the op builds them once per batch.

    python benchmarks/bench_planning.py [--world-size 8 2] [--seq-len 8192 16384 32768] [--rank 3]

Masks: "sliding" is a Gemma 4 sliding layer (W=1024, image blocks bidirectional) on packed
documents with images and trailing padding (the scenario catalog's ``long_row_info``); "causal" is
a global causal layer on the same batch.
Prints CPU seconds of this process per (mask, world size, length), which other processes on a
shared machine disturb less than wall time, and the growth exponent between the first and last
length. One thread, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from gemma4_flexring import Layout, MaskSpec
from gemma4_flexring.planning.context import plan_context
from gemma4_flexring.planning.plan import plan_pair
from gemma4_flexring.testing.cases import SPECS, long_row_info, with_window

MASKS = {"sliding": with_window(SPECS["sliding_vision"], 1024), "causal": SPECS["causal"]}


def plan_rank(spec: MaskSpec, tensors, layout: Layout, seq_len: int, rank: int) -> None:
    ctx = plan_context(spec, layout, seq_len, torch.device("cpu"), *tensors)
    for owner in range(layout.world_size):
        plan_pair(ctx, rank, owner, torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world-size", type=int, nargs="+", default=[8, 2])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--rank", type=int, default=None, help="default: world_size // 2 - 1")
    parser.add_argument("--layout", default="zigzag")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, spec in MASKS.items():
        for world in args.world_size:
            rank = max(world // 2 - 1, 0) if args.rank is None else args.rank
            times = []
            for seq_len in args.seq_len:
                layout, tensors = Layout(args.layout, world), long_row_info(seq_len).tensors()
                best = math.inf
                for _ in range(args.repeats):
                    start = time.process_time()
                    plan_rank(spec, tensors, layout, seq_len, rank)
                    best = min(best, time.process_time() - start)
                times.append(best)
            cells = "  ".join(f"S={s}: {t:.3f} s" for s, t in zip(args.seq_len, times))
            if args.seq_len[-1] != args.seq_len[0]:  # the growth exponent needs two lengths
                growth = math.log(times[-1] / times[0]) / math.log(args.seq_len[-1] / args.seq_len[0])
                cells += f"  exponent {growth:.2f}"
            print(f"{name:8s} P={world} rank {rank}: {cells}", flush=True)


if __name__ == "__main__":
    main()
