"""``python -m gemma4_flexring bench``: ring attention speed, traffic and memory on gloo ranks.

    python -m gemma4_flexring bench --world-size 8 --seq-len 131072 --heads 2 --kv-heads 1 \\
        --mask causal sliding packed vision --layout zigzag --json out.json

Spawns ``--world-size`` gloo ranks on this machine (``testing.launch.spawn``; one torch thread
each by default), or, with ``--device cuda``, one rank on the GPU (the flex kernel by default; times
taken once the GPU has finished, memory from the CUDA allocator's peak). Every figure is one layer
(or, with ``--stack N``, a Gemma-4-like stack of N layers: five sliding layers to one global one)
timed forward and backward, median of ``--repeats`` steps after one warm-up. Every step builds a
fresh ``SequenceInfo`` and empties the plan cache, so planning is part of the step; with
``--plan-ahead`` each step's batch is planned by ``plan_ahead`` first (waited for, untimed), as
``hf.RingTrainer`` and the ``train`` command plan the next batch during the current step. Masks and
metadata are the scenario catalog's bench figures (``testing/cases.py``: ``FIGURES``,
``figure_masks``, ``figure_info``). Per figure:

- step: forward + backward of the slowest rank; plan: the planning time and its share of the step;
- sent/bound: bytes sent per rank per layer (mean over ranks) against the lower bound, 3x the K/V
  rows of other ranks that some local query may see (K/V forward, K/V backward, dK/dV home);
- wait fwd/bwd: share of forward and backward time spent waiting on exchanges;
- mem f/b: the largest peak resident-memory growth of a rank during forward and backward, minus
  what the call returns (out and lse; dq, dk and dv), against the whole sequence's K+V bytes. Measured
  from the kernel's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) in ranks
  of their own, started with ``MALLOC_MMAP_THRESHOLD_`` fixed so that freed buffers leave the
  resident set. Times come from other ranks, under the default allocator: with the threshold
  fixed, every buffer above it maps fresh pages, which measured 2x the time of a sliding layer
  (hundreds of small calls) and 1.04x that of a causal one;
- pair cost: time per allowed (query, key) pair against the causal figure's, when causal runs too,
  planning left out (it is reported on its own, and a batch's plans serve every layer);
- Gpairs/s: allowed pairs (x batch x query heads) per second, forward + backward;
- vs zz: step against the zigzag layout's step for the same figure (``--layout zigzag ...``);
- balance: max / mean over ranks of the time not spent waiting (compare ``--layout zigzag
  contiguous balanced`` on uneven ``--packing`` rows: the balanced layout is built from the batch,
  weighing the figure's layers: with ``--stack``, five sliding layers to one global one);
- cpu bal: max / mean over ranks of the process's CPU time in the step (ranks that share cores
  with each other or with other work stretch each other's wall time, not their CPU time);
- best (below the table): per figure, the layout with the fastest step;
- baseline: aten SDPA at P=1, an all-gather CP (K/V all-gathered, SDPA with the dense mask of the
  local queries) at P>1, side by side in the same processes, when its dense mask fits in memory;
  its steps and the ring's are taken in turns (the ring first in every other round). The ratio is
  given three ways: median step over median baseline step, best over best, and the median of
  the rounds' ratios (each ring step over the baseline step beside it).

Targets are reported, not enforced.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..info import SequenceInfo
from ..kernels import KERNELS, default_kernel
from ..layout import Layout, layer_mix
from ..planning.cache import clear_mask_cache
from ..planning.masks import MaskSpec
from ..planning.metadata import informative
from ..stats import reset_ring_stats, ring_stats
from ..testing.cases import FIGURES, PACKINGS, figure_info, figure_masks, layout_of
from ..testing.launch import spawn
from .bench_measures import PeakCuda, PeakRss, mask_figures, nbytes

# The memory phase's processes: buffers of 64 KiB or more are mapped on their own and returned
# when freed, so the resident high-water mark follows live memory.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# ring / aten SDPA at P=1 (causal, forward + backward) by dtype; other dtypes take float32's.
SDPA_TARGETS = {"float32": 1.05, "bfloat16": 1.10}
TARGETS = {"sdpa": SDPA_TARGETS, "allgather": 1.1, "bytes": 1.25, "memory_p8": 0.4, "balance": 1.10}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
BASELINE_MASK_LIMIT = 1 << 28  # dense mask entries (per rank) the baseline may build


@dataclass
class Figure:
    """One figure: a mask kind on a layout, its layers' masks, their q, k and v ([layer][q, k, v];
    the memory phase makes the first layer's only), and its timed steps."""

    name: str
    kind: str
    layout: Layout
    layers: list[tuple[str, MaskSpec]]
    tensors: list[list[torch.Tensor]] = field(default_factory=list)
    steps: list[tuple] = field(default_factory=list)

    def info(self, args) -> SequenceInfo:
        """The figure's batch metadata on ``--device``, fresh: a new generation, so its plans are
        built again."""
        info = _info(self.name, args)
        return info if args.device == "cpu" else SequenceInfo(*(t.to(args.device) for t in info.tensors()))

    def zero_grads(self) -> None:
        for t in (t for layer in self.tensors for t in layer):
            t.grad = None


def _info(name: str, args) -> SequenceInfo:
    """The batch metadata of figure ``name`` under the command's options (``figure_info``)."""
    return figure_info(name, args.batch, args.seq_len, args.documents, args.packing)


def _layout(name: str, kind: str, world: int, args) -> Layout:
    """The figure's layout; a balanced one weighs the figure's layers (``layer_mix``)."""
    masks = layer_mix(spec for _, spec in figure_masks(name, args.window, args.stack))
    return layout_of(kind, world, _info(name, args), args.batch, args.seq_len, masks)


def run_rank(rank: int, world: int, args, phase: str) -> list[list[dict]] | None:
    """One rank of the "time" or the "memory" phase; rank 0 returns the rows of every rank, one
    per figure (``[rank][figure]``), the others None.

    Time: figures are timed in rounds, one step of each figure (and of its baseline) per round,
    so that the machine's drifts in speed, measured here at up to 1.5x over a minute, fall on
    every figure alike and ratios between figures hold. Memory: the first layer of each figure,
    after a warm-up step, in processes started with ``MEMORY_ENV``.
    """
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(rank)
    local = args.seq_len // world
    shapes = [(args.batch, heads, local, args.head_dim) for heads in (args.heads, args.kv_heads, args.kv_heads)]

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[bench] {phase}: {msg}", file=sys.stderr, flush=True)

    figures = [Figure(name, kind, _layout(name, kind, world, args), figure_masks(name, args.window, args.stack))
               for name, kind in itertools.product(args.mask, args.layout)]
    for figure in figures:
        layers = len(figure.layers) if phase == "time" else 1
        figure.tensors = [[torch.randn(s, generator=g).to(args.device, dtype).requires_grad_(True) for s in shapes]
                          for _ in range(layers)]
    if phase == "time":
        for repeat in range(args.repeats + 1):
            log(f"round {repeat + 1}/{args.repeats + 1} (the first warms up)")
            for figure in figures:
                # Built anew each round, outside the timing: every figure's dense mask at once may not fit.
                baseline = _baseline_step(rank, figure, args)
                ring, base = _ring_and_baseline(figure, baseline, args, ring_first=repeat % 2 == 0)
                if repeat:
                    figure.steps.append((*ring, base))
                del baseline
    rows = []
    for figure in figures:
        log(f"{figure.name} {figure.kind}")
        rows.append(_figure_row(rank, figure, args) if phase == "time" else _measure_memory(rank, figure, args))
        figure.tensors.clear()
    per_rank = _all_gather(rows, world) if world > 1 else [rows]
    return per_rank if rank == 0 else None


def _ring_and_baseline(figure: Figure, baseline, args, ring_first: bool) -> tuple[tuple, float | None]:
    """One ring step (``_ring_step``) and one baseline step (its seconds; None without one), taken
    in turns: the ring first in every other round, so that neither always runs on a machine warmed
    (or slowed) by the other."""
    if ring_first:
        ring = _ring_step(figure, args)
    base = None if baseline is None else _timed(baseline, args.device)
    if not ring_first:
        ring = _ring_step(figure, args)
    return ring, base


def _ring_step(figure: Figure, args) -> tuple:
    """One forward + backward of every layer with fresh metadata: (step, forward, backward,
    planning, forward wait, backward wait) seconds, bytes sent, and the process's CPU seconds."""
    from ..ahead import plan_ahead
    from ..api import ring_attention

    figure.zero_grads()
    info = figure.info(args)
    clear_mask_cache()  # plans are built again: planning is part of every step, or done ahead of it
    if args.plan_ahead:
        plan_ahead(info, [spec for _, spec in figure.layers], layout=figure.layout, dtype=DTYPES[args.dtype],
                   kernel=args.kernel).result()
    reset_ring_stats()
    cpu = time.process_time()
    start = _now(args.device)
    outs = [ring_attention(q, k, v, mask=spec, info=info, layout=figure.layout, kernel=args.kernel)
            for (_, spec), (q, k, v) in zip(figure.layers, figure.tensors)]
    mid = _now(args.device)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    end = _now(args.device)
    cpu = time.process_time() - cpu
    stats = ring_stats()
    figure.zero_grads()
    return (end - start, mid - start, end - mid, stats.planning_s, stats.wait_forward_s, stats.wait_backward_s,
            stats.bytes_sent, cpu)


def _figure_row(rank: int, figure: Figure, args) -> dict:
    """The medians of the figure's timed steps, its allowed pairs and its lower bound on bytes;
    against the baseline, the best step's ratio to the best baseline step and the median of the
    rounds' ratios (each ring step over the baseline step taken beside it)."""
    step, fwd, bwd, plan, wait_f, wait_b, sent, cpu = (statistics.median(t[i] for t in figure.steps) for i in range(8))
    bases = [t[8] for t in figure.steps if t[8] is not None]
    paired = [t[0] / t[8] for t in figure.steps if t[8] is not None]
    info = _info(figure.name, args)  # counted on the CPU
    per_layer = [mask_figures(spec, info, figure.layout, args.seq_len, rank) for _, spec in figure.layers]
    row_bytes = 2 * args.batch * args.kv_heads * args.head_dim * DTYPES[args.dtype].itemsize
    return dict(step=step, fwd=fwd, bwd=bwd, plan=plan, wait_f=wait_f, wait_b=wait_b, sent=sent, cpu=cpu,
                bound=3 * sum(r for _, r in per_layer) * row_bytes, pairs=sum(p for p, _ in per_layer),
                base=statistics.median(bases) if bases else None,
                ratio_best=min(t[0] for t in figure.steps) / min(bases) if bases else None,
                ratio_median=statistics.median(paired) if paired else None)


def _measure_memory(rank: int, figure: Figure, args) -> dict:
    """Peak workspace of the ring's forward and backward on the first layer, and of the baseline,
    each after a warm-up step."""
    from ..api import ring_attention

    _ring_step(figure, args)
    clear_mask_cache()  # the measured call plans afresh; no plan of the warm-up is freed during it
    q, k, v = figure.tensors[0]
    peak = PeakRss if args.device == "cpu" else PeakCuda
    with peak() as mem_f:
        out = ring_attention(q, k, v, mask=figure.layers[0][1], info=figure.info(args), layout=figure.layout,
                             kernel=args.kernel)
    grad = torch.ones_like(out)
    with peak() as mem_b:
        out.backward(grad)
    row = dict(workspace_f=mem_f.growth - nbytes(out) - out.numel() // args.head_dim * 4,
               workspace_b=mem_b.growth - nbytes(q, k, v), base_mem=None)
    del out
    baseline = _baseline_step(rank, figure, args)
    if baseline is not None:
        baseline()
        with peak() as mem:
            baseline()
        row["base_mem"] = mem.growth - nbytes(q, k, v)
    return row


def _now(device: str) -> float:
    """The time once ``device`` has finished the work queued so far."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _timed(fn, device: str) -> float:
    start = _now(device)
    fn()
    return _now(device) - start


def _all_gather(obj, world: int) -> list:
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _baseline_step(rank: int, figure: Figure, args):
    """One forward + backward of aten SDPA (P=1) or all-gather CP (P>1) on the figure's first
    layer, as a callable holding its dense mask [B, L, S]; None without ``--baseline``, for a
    stack, or when that mask would be too large."""
    world = args.world_size
    if not args.baseline or len(figure.layers) > 1 or args.batch * (args.seq_len // world) * args.seq_len > BASELINE_MASK_LIMIT:
        return None
    warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated")
    import torch.distributed.nn.functional as dist_fn
    import torch.nn.functional as F

    from ..testing.reference import reference_mask

    qkv = q, k, v = figure.tensors[0]
    spec, info = figure.layers[0][1], _info(figure.name, args)
    positions = figure.layout.positions(args.seq_len, rank)
    allowed = reference_mask(spec, info, args.batch, args.seq_len)[:, None, positions].to(args.device)
    causal_only = world == 1 and spec == MaskSpec(causal=True) and not any(
        t is not None for t in informative(*info.tensors()))

    def step():
        for t in qkv:
            t.grad = None
        if world == 1:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal_only else allowed,
                                                 is_causal=causal_only, enable_gqa=True)
        else:
            k_all, v_all = (figure.layout.unshard(list(dist_fn.all_gather(t)), dim=2) for t in (k, v))
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=allowed, enable_gqa=True)
        out.backward(torch.ones_like(out))

    return step


def summarize(name, kind, layers, per_rank, args, whole_kv) -> dict:
    n = len(layers)
    slowest = max(r["step"] for r in per_rank)
    busy = [r["step"] - r["wait_f"] - r["wait_b"] for r in per_rank]
    cpu = [r["cpu"] for r in per_rank]
    sent = statistics.mean(r["sent"] for r in per_rank) / n
    bound = statistics.mean(r["bound"] for r in per_rank) / n
    pairs = sum(r["pairs"] for r in per_rank)
    fig = {
        "figure": name if not args.stack else f"stack{args.stack}:{name}",
        "layers": n, "world_size": args.world_size, "seq_len": args.seq_len, "layout": kind,
        "packing": args.packing if name == "packed" else None,
        "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
        "dtype": args.dtype, "window": args.window, "device": args.device,
        "kernel": args.kernel or default_kernel(torch.device(args.device)),
        "step_s": slowest, "forward_s": max(r["fwd"] for r in per_rank), "backward_s": max(r["bwd"] for r in per_rank),
        "planning_s": max(r["plan"] for r in per_rank),
        "planning_share": max(r["plan"] / r["step"] for r in per_rank),
        "bytes_sent_per_rank_layer": sent, "bytes_lower_bound_per_rank_layer": bound,
        "bytes_ratio": sent / bound if bound else (1.0 if sent == 0 else float("inf")),
        "bytes_sent_max_rank_layer": max(r["sent"] for r in per_rank) / n,
        "wait_share_forward": max(r["wait_f"] / r["fwd"] for r in per_rank),
        "wait_share_backward": max(r["wait_b"] / r["bwd"] for r in per_rank),
        "workspace_forward_bytes": max(r["workspace_f"] for r in per_rank),
        "workspace_backward_bytes": max(r["workspace_b"] for r in per_rank), "whole_kv_bytes": whole_kv,
        "memory_ratio_forward": max(r["workspace_f"] for r in per_rank) / whole_kv,
        "memory_ratio_backward": max(r["workspace_b"] for r in per_rank) / whole_kv,
        "allowed_pairs": pairs,
        "pairs_per_s": pairs * args.heads / slowest,
        "seconds_per_pair": max(r["step"] - r["plan"] for r in per_rank) / pairs if pairs else None,
        "balance": max(busy) / statistics.mean(busy),
        "busy_s_per_rank": busy, "cpu_s_per_rank": cpu, "cpu_balance": max(cpu) / statistics.mean(cpu),
    }
    bases = [r["base"] for r in per_rank]
    if all(b is not None for b in bases):
        fig["baseline"] = "sdpa" if args.world_size == 1 else "allgather"
        fig["baseline_s"] = max(bases)
        fig["baseline_ratio"] = slowest / max(bases)
        # Per rank from steps taken in turns with the baseline's (best of each, median of the rounds'
        # ratios); the slowest rank's.
        fig["baseline_ratio_best"] = max(r["ratio_best"] for r in per_rank)
        fig["baseline_ratio_median"] = max(r["ratio_median"] for r in per_rank)
        fig["baseline_memory_ratio"] = max(r["base_mem"] for r in per_rank) / whole_kv
    return fig


def table(figures: list[dict]) -> str:
    """The figures side by side, then, for each figure run under several layouts, the layout with
    the fastest step."""
    causal = {f["layout"]: f for f in figures if f["figure"] == "causal"}
    zigzag = {f["figure"]: f for f in figures if f["layout"] == "zigzag"}
    head = (f"{'figure':<14}{'layout':<11}{'step ms':>9}{'vs zz':>7}{'plan ms':>9}{'plan%':>7}{'sent MB':>9}{'bound MB':>9}"
            f"{'ratio':>7}{'wait f/b %':>12}{'mem/KV f/b':>12}{'pair cost':>10}{'Gpairs/s':>9}{'balance':>8}{'cpu bal':>8}"
            "  baseline")
    lines = [head]
    for f in figures:
        ref = causal.get(f["layout"])
        cost = f"{f['seconds_per_pair'] / ref['seconds_per_pair']:.2f}" if ref and f["seconds_per_pair"] else "-"
        zz = zigzag.get(f["figure"])
        versus = f"{f['step_s'] / zz['step_s']:.2f}" if zz else "-"
        base = (f"{f['baseline']} {f['baseline_s'] * 1e3:.0f} ms, ratio {f['baseline_ratio']:.2f} "
                f"(best {f['baseline_ratio_best']:.3f}, median {f['baseline_ratio_median']:.3f}), "
                f"mem/KV {f['baseline_memory_ratio']:.2f}") if "baseline" in f else "n/a"
        lines.append(
            f"{f['figure']:<14}{f['layout']:<11}{f['step_s'] * 1e3:>9.1f}{versus:>7}{f['planning_s'] * 1e3:>9.1f}"
            f"{f['planning_share'] * 100:>6.1f}%{f['bytes_sent_per_rank_layer'] / 1e6:>9.2f}"
            f"{f['bytes_lower_bound_per_rank_layer'] / 1e6:>9.2f}"
            f"{f['bytes_ratio']:>7.2f}{f['wait_share_forward'] * 100:>6.0f}/{f['wait_share_backward'] * 100:<5.0f}"
            f"{f['memory_ratio_forward']:>7.2f}/{f['memory_ratio_backward']:<4.2f}{cost:>10}{f['pairs_per_s'] / 1e9:>9.3f}"
            f"{f['balance']:>8.2f}{f['cpu_balance']:>8.2f}  {base}")
    for name in dict.fromkeys(f["figure"] for f in figures):
        runs = [f for f in figures if f["figure"] == name]
        if len(runs) > 1:
            best = min(runs, key=lambda f: f["step_s"])
            lines.append(f"best {name}: {best['layout']} (step {best['step_s'] * 1e3:.0f} ms, balance "
                         f"{best['balance']:.2f}, cpu {best['cpu_balance']:.2f})")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gemma4_flexring bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--mask", nargs="+", choices=FIGURES, default=["causal"], help="one figure per mask")
    p.add_argument("--window", type=int, default=1024, help="sliding window of sliding layers")
    p.add_argument("--documents", type=int, default=5, help="packed documents of the packed mask")
    p.add_argument("--layout", nargs="+", choices=["contiguous", "zigzag", "balanced"], default=["zigzag"],
                   help="one figure per layout and mask, side by side; balanced is built from the batch")
    p.add_argument("--packing", choices=["equal", *PACKINGS], default="equal",
                   help="documents of the packed mask: --documents equal ones, or uneven rows (sets --batch)")
    p.add_argument("--stack", type=int, default=0,
                   help="run each mask's metadata through a Gemma-4-like stack of N layers (5 sliding : 1 global)")
    p.add_argument("--plan-ahead", action="store_true",
                   help="plan each step's batch with plan_ahead before the step (untimed): planning off the step")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: one rank (--world-size 1) on the GPU, timed to its completion, memory from the "
                        "CUDA allocator's peak")
    p.add_argument("--kernel", choices=sorted(KERNELS), default=None,
                   help="chunk kernel (default: the CPU's, aten); flex runs eagerly on the CPU: slow, for its traffic")
    p.add_argument("--no-baseline", dest="baseline", action="store_false")
    p.add_argument("--json", help="write the figures to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "cuda" and (args.world_size != 1 or not torch.cuda.is_available()):
        print("bench: --device cuda runs one rank on this machine's GPU: it needs --world-size 1 and CUDA "
              f"(world size {args.world_size}, CUDA {'available' if torch.cuda.is_available() else 'not available'})")
        return 2
    if args.packing != "equal":
        args.batch = len(PACKINGS[args.packing])
    # A world of one runs in a process of its own too (the memory phase's environment), without a group.
    results = {phase: spawn(run_rank, args.world_size, args, phase, env=env, join_group=args.world_size > 1)[0]
               for phase, env in (("time", {}), ("memory", MEMORY_ENV))}
    whole_kv = 2 * args.batch * args.kv_heads * args.seq_len * args.head_dim * DTYPES[args.dtype].itemsize
    figures = [summarize(name, kind, figure_masks(name, args.window, args.stack),
                         [{**timed[i], **measured[i]} for timed, measured in zip(results["time"], results["memory"])],
                         args, whole_kv)
               for i, (name, kind) in enumerate(itertools.product(args.mask, args.layout))]
    print(f"P={args.world_size} S={args.seq_len} B={args.batch} H={args.heads}/{args.kv_heads} D={args.head_dim} "
          f"{args.dtype} packing={args.packing} window={args.window} threads/rank={args.threads} "
          f"device={args.device} kernel={args.kernel or default_kernel(torch.device(args.device))}"
          + (f" stack={args.stack}" if args.stack else "") + (" plan-ahead" if args.plan_ahead else ""))
    print(table(figures))
    sdpa = ", ".join(f"{d} {t}" for d, t in SDPA_TARGETS.items())
    print(f"targets: sent/bound <= {TARGETS['bytes']}, mem/KV <= {TARGETS['memory_p8']} at P=8, "
          f"ring/sdpa at P=1 <= {SDPA_TARGETS.get(args.dtype, SDPA_TARGETS['float32'])} in {args.dtype} ({sdpa}), "
          f"ring/all-gather <= {TARGETS['allgather']}, balance <= {TARGETS['balance']} (zigzag)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "targets": TARGETS, "figures": figures}, f, indent=1)
    return 0
