"""``python -m gemma4_flexring plan``: see a batch's mask as the ring plans it, per rank.

    python -m gemma4_flexring plan --world-size 4 --seq-len 8192 --mask packed --packing long_four \\
        --layout balanced --output plan.png
    python -m gemma4_flexring plan --world-size 4 --seq-len 8192 --mask causal --flex prefix_lm --output -

Plans one layer's mask over a bench figure's metadata (``testing/cases.py``: ``figure_masks``,
``figure_info``; the same masks, packings and windows as ``bench``) for a layout, as the op
does (exact block flags, ``planning/flags.py``), and draws it (PNG; needs the ``plot`` extra,
matplotlib):

- left: every (query block, key block) of the whole sequence in layout order, rank by rank
  (rows: the queries each rank holds; columns: the keys each owner holds), classed full, partial
  (evaluated row by row) or empty, in every batch row at once (a block is full only if it is full
  in every row, empty only if it is empty in every row);
- right: the key rows each owner sends each reader (what the exchange moves), with the counts.

It prints the same figures: per (reader, owner) pair the full and partial blocks and the rows
sent, and per rank the rows it receives. ``--output -`` prints without drawing.

Shape legend: S whole sequence, P ranks, NB = S / block size blocks.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from ..layout import Layout
from ..planning.blocks import EMPTY, FULL, PARTIAL, Blocks
from ..planning.context import plan_context
from ..planning.flags import segment_flags
from ..planning.flexmask import FlexMask, planner_spec
from ..planning.masks import MaskSpec
from ..planning.plan import needed_kv_rows
from ..testing.cases import FIGURES, FLEX_MASKS, PACKINGS, figure_info, figure_masks

CLASS_NAMES = {EMPTY: "empty", PARTIAL: "partial", FULL: "full"}


@dataclass(frozen=True)
class MaskPicture:
    """A layer's mask as the ring plans it (see the module doc).

    Attributes:
        classes: int8 [NB, NB], block classes (``EMPTY``, ``PARTIAL``, ``FULL``), query blocks by
            rank in layout order (rows), key blocks by owner in layout order (columns).
        rank_blocks: the first block of each rank, and NB: [P + 1].
        rows_sent: int [P, P], rows_sent[owner][reader]: key rows ``owner`` sends ``reader``.
        pair_blocks: per (reader, owner) the count of each class, {class: int [P, P]}.
    """

    classes: torch.Tensor
    rank_blocks: list[int]
    rows_sent: torch.Tensor
    pair_blocks: dict[int, torch.Tensor]


def mask_picture(spec: MaskSpec | FlexMask, info, layout: Layout, seq_len: int, block_size: int = 128) -> MaskPicture:
    """The picture of ``spec`` (a MaskSpec or a FlexMask) over ``info`` ([B, S] metadata) sharded
    by ``layout``."""
    ctx = plan_context(planner_spec(spec, torch.device("cpu")), layout, seq_len, torch.device("cpu"), *info.tensors(), block_size=block_size)
    ranks = range(layout.world_size)
    bands = [[pair_classes(ctx, reader, owner) for owner in ranks] for reader in ranks]
    classes = torch.cat([torch.cat(band, dim=1) for band in bands], dim=0)
    sizes = [band[0].shape[0] for band in bands]
    rank_blocks = [sum(sizes[:r]) for r in range(len(sizes) + 1)]
    rows_sent = torch.tensor([[0 if owner == reader else sum(b - a for a, b in needed_kv_rows(ctx, reader, owner))
                               for reader in ranks] for owner in ranks])
    pair_blocks = {c: torch.tensor([[int((bands[r][o] == c).sum()) for o in ranks] for r in ranks])
                   for c in (FULL, PARTIAL)}
    return MaskPicture(classes, rank_blocks, rows_sent, pair_blocks)


def pair_classes(ctx, reader: int, owner: int) -> torch.Tensor:
    """int8 [reader's blocks, owner's blocks]: each block pair's class over every batch row, the
    blocks of each rank's segments in local order."""
    rows = []
    for qs in ctx.layout.segments(ctx.seq_len, reader):
        q = Blocks(qs.global_start, qs.length, ctx.block_size, ctx.device)
        row = []
        for ks in ctx.layout.segments(ctx.seq_len, owner):
            k = Blocks(ks.global_start, ks.length, ctx.block_size, ctx.device)
            if ctx.mask is None:
                row.append(torch.full((q.count, k.count), FULL, dtype=torch.int8))
                continue
            flags = segment_flags(ctx.mask, q, k, ctx.batch)
            full, some = flags.all_allowed.all(0), flags.any_allowed.any(0)
            row.append(torch.where(full, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.int8))
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


def report(picture: MaskPicture, title: str) -> str:
    """The figures of ``picture`` as text: per (reader, owner) full / partial blocks and rows sent."""
    world = picture.rows_sent.shape[0]
    lines = [title, f"{'reader':>8}{'owner':>7}{'full':>8}{'partial':>9}{'rows':>9}"]
    for reader in range(world):
        for owner in range(world):
            lines.append(f"{reader:>8}{owner:>7}{int(picture.pair_blocks[FULL][reader, owner]):>8}"
                         f"{int(picture.pair_blocks[PARTIAL][reader, owner]):>9}"
                         f"{'-' if owner == reader else int(picture.rows_sent[owner, reader]):>9}")
    received = picture.rows_sent.sum(0).tolist()
    lines.append("rows received per rank: " + ", ".join(f"{r}: {n}" for r, n in enumerate(received)))
    return "\n".join(lines)


def draw(picture: MaskPicture, title: str, path: str) -> None:
    """Write ``picture`` as a PNG at ``path`` (matplotlib, the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError as e:
        raise SystemExit("plan: drawing needs matplotlib: pip install 'gemma4-flexring[plot]' "
                         f"(or --output - to print the figures only) [{e}]") from e
    world = picture.rows_sent.shape[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [3, 2]})
    left.imshow(picture.classes.numpy(), cmap=ListedColormap(["#ffffff", "#f4a259", "#2a4d69"]), vmin=0, vmax=2,
                interpolation="nearest")
    for edge in picture.rank_blocks[1:-1]:
        left.axhline(edge - 0.5, color="#c0392b", linewidth=1)
        left.axvline(edge - 0.5, color="#c0392b", linewidth=1)
    middles = [(a + b - 1) / 2 for a, b in zip(picture.rank_blocks, picture.rank_blocks[1:])]
    left.set_xticks(middles, [f"owner {r}" for r in range(world)])
    left.set_yticks(middles, [f"rank {r}" for r in range(world)])
    left.set_title("blocks: full (dark), partial (orange), empty (white)")
    right.imshow(picture.rows_sent.numpy(), cmap="Blues")
    for owner in range(world):
        for reader in range(world):
            right.text(reader, owner, str(int(picture.rows_sent[owner, reader])), ha="center", va="center",
                       color="#c0392b")
    right.set_xticks(range(world), [f"to {r}" for r in range(world)])
    right.set_yticks(range(world), [f"from {r}" for r in range(world)])
    right.set_title("key rows sent (owner -> reader)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gemma4_flexring plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--mask", choices=FIGURES, default="packed", help="the bench figure whose mask and metadata to plan")
    p.add_argument("--layer", choices=["global", "sliding"], default=None,
                   help="a Gemma 4 stack's global (causal) or sliding layer over the figure's metadata "
                        "(default: the figure's own mask, as bench runs it)")
    p.add_argument("--flex", choices=[n.removeprefix("flex_") for n in FLEX_MASKS], default=None,
                   help="a FlexMask of the test catalog (presets, shared prefix, block diffusion) in place of the "
                        "layer's mask, over the figure's metadata")
    p.add_argument("--window", type=int, default=1024, help="sliding window of sliding layers")
    p.add_argument("--documents", type=int, default=5, help="packed documents of the packed mask")
    p.add_argument("--packing", choices=["equal", *PACKINGS], default="equal")
    p.add_argument("--layout", choices=["contiguous", "zigzag", "balanced"], default="zigzag")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--output", default="plan.png", help="the PNG to write; - prints the figures only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    batch = len(PACKINGS[args.packing]) if args.packing != "equal" else 1
    info = figure_info(args.mask, batch, args.seq_len, args.documents, args.packing)
    (_, spec), = figure_masks(args.mask, args.window, 0)
    if args.layer is not None:
        spec = dict(figure_masks(args.mask, args.window, 6))[args.layer]  # a stack: 5 sliding, 1 global
    if args.flex is not None:
        spec = FLEX_MASKS[f"flex_{args.flex}"](batch, args.seq_len)
    if args.layout == "balanced":  # weighing the layer's mask
        layout = Layout.balanced(info, args.world_size, masks=[(spec, 1)])
    else:
        layout = Layout(args.layout, args.world_size)
    picture = mask_picture(spec, info, layout, args.seq_len, args.block_size)
    title = (f"{args.mask} ({spec}), {args.layout} layout, P={args.world_size}, S={args.seq_len}, "
             f"packing {args.packing}, blocks of {args.block_size}")
    print(report(picture, title))
    if args.output != "-":
        draw(picture, title, args.output)
        print(f"wrote {args.output}")
    return 0
