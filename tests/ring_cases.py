"""Deterministic inputs for ring tests and the worker that runs one rank of a case."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from gemma4_flexring import Layout, MaskSpec, SequenceInfo, ring_attention
from gemma4_flexring import exchange
from gemma4_flexring.planning import context
from gemma4_flexring.planning.context import plan_context
from gemma4_flexring.planning.plan import needed_kv_rows, plan_pair

SPECS = {
    "causal": MaskSpec(causal=True),
    "sliding": MaskSpec(causal=True, sliding_window=7),
    "sliding_wide": MaskSpec(causal=True, sliding_window=40),
    "sliding_vision": MaskSpec(causal=True, sliding_window=7, block_bidirectional=True),
    "causal_vision": MaskSpec(causal=True, block_bidirectional=True),
    "bidirectional": MaskSpec(causal=False),
    "bidirectional_window": MaskSpec(causal=False, sliding_window=5),
}
INFOS = ("none", "documents", "padding", "vision", "packed_padded", "all")


@dataclass(frozen=True)
class Case:
    spec: str
    info: str
    dtype: torch.dtype = torch.float64
    seq_len: int = 48
    batch: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    scale: float | None = None
    seed: int = 0
    block_size: int | None = None
    piece_rows: int | None = None  # the exchange's piece size (None: the package's)
    strided: bool = False  # q, k, v with a non-unit stride in the head dim
    kernel: str | None = None  # the chunk kernel (None: by device)

    @property
    def mask(self) -> MaskSpec:
        return SPECS[self.spec]


def make_info(kind: str, batch: int, seq_len: int) -> SequenceInfo | None:
    """Metadata whose blocks and documents cross rank boundaries; image 0 is longer than W=7."""
    if kind == "none":
        return None
    s = seq_len
    docs = torch.zeros(batch, s, dtype=torch.long)
    docs[:, s * 3 // 8:] = 1
    docs[:, s * 7 // 8:] = 2
    docs[-1, : s // 4] = 3  # rows differ
    blocks = torch.full((batch, s), -1, dtype=torch.long)
    blocks[:, s // 5: s * 3 // 5] = 0
    blocks[:, s * 3 // 4: s * 3 // 4 + 4] = 1
    padding = torch.zeros(batch, s, dtype=torch.bool)
    padding[-1, s * 7 // 8:] = True  # a whole padded document: its queries see no key
    padding[0, :2] = True
    use = {"documents": (docs, None, None), "padding": (None, None, padding), "vision": (None, blocks, None),
           "packed_padded": (docs, None, padding), "all": (docs, blocks, padding)}[kind]
    return SequenceInfo(*use)


def make_tensors(case: Case) -> tuple[torch.Tensor, ...]:
    """Whole-sequence q [B, Hq, S, D], k, v [B, Hkv, S, D] and an output gradient."""
    g = torch.Generator().manual_seed(case.seed)
    b, s, d = case.batch, case.seq_len, case.head_dim
    q = torch.randn(b, case.q_heads, s, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, case.kv_heads, s, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, case.kv_heads, s, d, generator=g, dtype=torch.float64)
    grad = torch.randn(b, case.q_heads, s, d, generator=g, dtype=torch.float64)
    return tuple(t.to(case.dtype) for t in (q, k, v, grad))


def layout_of(kind: str, world_size: int, info: SequenceInfo | None, batch: int, seq_len: int) -> Layout:
    """``kind`` over ``world_size`` ranks; "balanced" is computed from the metadata ``info``
    (None: a [batch, seq_len] batch without metadata)."""
    if kind != "balanced":
        return Layout(kind, world_size)
    return Layout.balanced(info or SequenceInfo(shape=(batch, seq_len)), world_size)


def make_layout(kind: str, world_size: int, case: Case) -> Layout:
    """``layout_of`` the case's metadata (whose short sequences give small grains, hence many
    segments per rank)."""
    return layout_of(kind, world_size, make_info(case.info, case.batch, case.seq_len), case.batch, case.seq_len)


def run_case(rank: int, world_size: int, case: Case, layout_kind: str,
             tensors: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
    """One rank's (out, dq, dk, dv) for its shard of ``case`` (or of whole-sequence ``tensors``:
    q, k, v, grad, in place of ``make_tensors(case)``)."""
    q, k, v, grad = make_tensors(case) if tensors is None else tensors
    layout = make_layout(layout_kind, world_size, case)
    local = [layout.shard(t, 2, rank).clone().requires_grad_(True) for t in (q, k, v)]
    if case.strided:
        local = [t.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_(True) for t in local]
        assert all(t.stride(-1) != 1 for t in local)
    with planning_sizes(case.block_size, case.piece_rows):
        out = ring_attention(*local, mask=case.mask, info=make_info(case.info, case.batch, case.seq_len),
                             layout=layout, scale=case.scale, kernel=case.kernel)
        out.backward(layout.shard(grad, 2, rank))
    return (out.detach(), *(t.grad for t in local))


@contextlib.contextmanager
def planning_sizes(block_size: int | None, piece_rows: int | None):
    """This block size and piece size in force (in this process) within the block; None keeps
    the package's."""
    sizes = "BLOCK_SIZE", "MIN_PIECE_ROWS", "MIN_HALF_PIECE_ROWS", "PIECES_PER_CHUNK"
    modules = context, exchange, exchange, exchange
    saved = [getattr(m, n) for m, n in zip(modules, sizes)]
    if block_size is not None:
        context.BLOCK_SIZE = block_size
    if piece_rows is not None:  # pieces of that many rows (a block, if larger; rows that travel may be
        # cut down to half as many, to keep pace: ``exchange.piece_bounds``)
        exchange.MIN_PIECE_ROWS = exchange.MIN_HALF_PIECE_ROWS = piece_rows
        exchange.PIECES_PER_CHUNK = 1 << 30
    try:
        yield
    finally:
        for module, name, value in zip(modules, sizes, saved):
            setattr(module, name, value)


def run_cases(rank: int, world_size: int, cases: list[Case], layout_kind: str) -> list:
    return [run_case(rank, world_size, c, layout_kind) for c in cases]


def causal_step_stats(rank: int, world_size: int):
    """Ring counters of one contiguous causal forward and backward (float32, B=1, Hkv=2, L=8, D=8)."""
    from gemma4_flexring import reset_ring_stats, ring_stats

    case = Case("causal", "none", torch.float32, seq_len=8 * world_size, batch=1)
    reset_ring_stats()
    run_case(rank, world_size, case, "contiguous")
    return ring_stats()


# Long sequences with a small window and small blocks: most owners hold nothing a rank needs (its
# exchange is skipped), the rest send a halo of about W rows; documents and padding cut more.
EXCHANGE_CASES = [
    Case("sliding", "none", seq_len=192, block_size=8),
    Case("sliding_vision", "all", seq_len=192, block_size=8),
    Case("bidirectional_window", "packed_padded", seq_len=192, block_size=8),
    Case("causal", "documents", seq_len=192, block_size=8),
]


def exchange_traffic(rank: int, world_size: int, case: Case, layout_kind: str) -> tuple[int, int, int]:
    """(bytes this rank sent in one forward and backward of ``case``, the bytes the plans imply,
    K/V rows that some local query may see, summed over the other owners).

    The plans imply: every other rank's needed rows of this rank's chunk, sent forward and
    backward, and the dK/dV of the rows this rank read of other chunks, sent home (rows of whole
    key blocks for the flex kernel).
    """
    from gemma4_flexring.kernels import KERNELS
    from gemma4_flexring import reset_ring_stats, ring_stats
    from gemma4_flexring.testing.reference import reference_mask

    layout = Layout(layout_kind, world_size)
    info = make_info(case.info, case.batch, case.seq_len)
    ctx = plan_context(case.mask, layout, case.seq_len, torch.device("cpu"),
                       *(() if info is None else info.tensors()), block_size=case.block_size)
    rows = lambda runs: sum(b - a for a, b in runs)  # noqa: E731
    whole_blocks = KERNELS[case.kernel or "aten"].reads_whole_blocks
    needed_by_others = sum(rows(needed_kv_rows(ctx, reader, rank, whole_blocks))
                           for reader in range(world_size) if reader != rank)
    plans = [plan_pair(ctx, rank, owner, case.dtype) for owner in range(world_size) if owner != rank]
    read_of_others = sum(rows(plan.pair_rows if whole_blocks else plan.kv_rows) for plan in plans)
    row_bytes = 2 * case.batch * case.kv_heads * case.head_dim * torch.empty((), dtype=case.dtype).element_size()
    allowed = reference_mask(case.mask, info, case.batch, case.seq_len)  # [B, S, S]
    seen = allowed[:, layout.positions(case.seq_len, rank)].any(1).any(0)  # keys some local query may see
    lower = sum(int(seen[layout.positions(case.seq_len, owner)].sum()) for owner in range(world_size) if owner != rank)
    reset_ring_stats()
    run_case(rank, world_size, case, layout_kind)
    return ring_stats().bytes_sent, row_bytes * (2 * needed_by_others + read_of_others), lower


def mesh_matches_default_group(rank: int, world_size: int) -> float:
    """Max difference between ``group=<1-D DeviceMesh>`` and the default group."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    q, k, v, _ = make_tensors(Case("sliding", "none"))
    layout = Layout("zigzag", world_size)
    q, k, v = (layout.shard(t, 2, rank) for t in (q, k, v))
    by_mesh = ring_attention(q, k, v, mask=SPECS["sliding"], layout=layout, group=mesh["cp"])
    by_default = ring_attention(q, k, v, mask=SPECS["sliding"], layout=layout)
    return float((by_mesh - by_default).abs().max())


def agreements_over_layers(rank: int, world_size: int) -> list[int]:
    """Agreements held by three layer calls (two masks) per batch, over two batches."""
    from gemma4_flexring import reset_ring_stats, ring_stats

    case = Case("sliding", "all", seq_len=8 * world_size)
    q, k, v, _ = make_tensors(case)
    layout = Layout("zigzag", world_size)
    q, k, v = (layout.shard(t, 2, rank) for t in (q, k, v))
    counts = []
    for _ in range(2):
        info = make_info("all", case.batch, case.seq_len)
        reset_ring_stats()
        for spec in (SPECS["sliding"], SPECS["causal"], SPECS["sliding"]):
            ring_attention(q, k, v, mask=spec, info=info, layout=layout)
        counts.append(ring_stats().agreements)
    return counts


def bad_kernel_on_rank_zero(rank: int, world_size: int, name: str) -> None:
    """Rank 0 asks for kernel ``name``, the others for the default: all must raise."""
    q, k, v, _ = make_tensors(Case("causal", "none", seq_len=8 * world_size))
    layout = Layout("contiguous", world_size)
    q, k, v = (layout.shard(t, 2, rank) for t in (q, k, v))
    ring_attention(q, k, v, layout=layout, kernel=name if rank == 0 else None)
