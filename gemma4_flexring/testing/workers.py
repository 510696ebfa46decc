"""What ranks run in the ring tests: ``fn(rank, world_size, ...)`` for ``launch.Cluster.run`` (or
called directly as the world of one), and the float64 reference each result is compared with.

Shape legend: B batch rows, S whole sequence, L = S / P this rank's rows, Hq query heads, Hkv
key/value heads, D head dim.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import FlexMask, presets, Layout, MaskSpec, SequenceInfo, exchange, reset_ring_stats, ring_attention, ring_stats
from ..planning import context
from ..planning.context import plan_context
from ..planning.flexmask import planner_spec
from ..planning.plan import needed_kv_rows, plan_pair
from .cases import SPECS, Case, layout_of, make_info, make_layout, make_tensors
from .reference import reference_gradients, reference_mask


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


def _sharded_step(rank: int, layout: Layout, tensors, block_size: int | None, piece_rows: int | None,
                  strided: bool = False, **options) -> tuple[Tensor, ...]:
    """This rank's (out [B, Hq, L, D], dq, dk, dv) of ``ring_attention(**options)`` on its shard of
    the whole-sequence q, k, v and output gradient ``tensors`` (``strided``: q, k, v with a
    non-unit stride in the head dim)."""
    q, k, v, grad = tensors
    local = [layout.shard(t, 2, rank).clone().requires_grad_(True) for t in (q, k, v)]
    if strided:
        local = [t.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_(True) for t in local]
        assert all(t.stride(-1) != 1 for t in local)
    with planning_sizes(block_size, piece_rows):
        out = ring_attention(*local, layout=layout, **options)
        out.backward(layout.shard(grad, 2, rank))
    return (out.detach(), *(t.grad for t in local))


def run_case(rank: int, world_size: int, case: Case, layout_kind: str,
             tensors: tuple[Tensor, ...] | None = None) -> tuple[Tensor, ...]:
    """One rank's (out, dq, dk, dv) for its shard of ``case`` (or of whole-sequence ``tensors``:
    q, k, v, grad, in place of ``make_tensors(case)``)."""
    return _sharded_step(rank, make_layout(layout_kind, world_size, case),
                         make_tensors(case) if tensors is None else tensors, case.block_size, case.piece_rows,
                         case.strided, mask=case.mask, info=case.metadata(), scale=case.scale, kernel=case.kernel)


def run_cases(rank: int, world_size: int, cases: list[Case], layout_kind: str) -> list:
    return [run_case(rank, world_size, c, layout_kind) for c in cases]


def reference(case: Case) -> list[Tensor]:
    """Float64 (out, dq, dk, dv) of ``case`` on the whole sequence."""
    q, k, v, grad = (t.to(torch.float64) for t in make_tensors(case))
    return reference_gradients(q, k, v, grad, case.mask, case.metadata(), case.scale)


# ------------------------------------------------------------------------------ random problems


@dataclass
class Example:
    """One random problem of the property test; the metadata tensors are whole-sequence [B, S]
    (None when absent)."""

    world_size: int
    layout: str
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    seq_len: int
    mask: MaskSpec
    document_ids: Tensor | None
    block_ids: Tensor | None
    padding: Tensor | None
    scale: float | None
    block_size: int
    seed: int
    piece_rows: int | None = None  # the exchange's pieces (None: the package's)

    def info(self) -> SequenceInfo | None:
        if self.document_ids is None and self.block_ids is None and self.padding is None:
            return None
        return SequenceInfo(self.document_ids, self.block_ids, self.padding)

    def make_layout(self) -> Layout:
        """The example's layout; a balanced one is computed from its metadata."""
        return layout_of(self.layout, self.world_size, self.info(), self.batch, self.seq_len)

    def tensors(self) -> tuple[Tensor, ...]:
        """Whole-sequence float64 q [B, Hq, S, D], k, v [B, Hkv, S, D] and an output gradient."""
        g = torch.Generator().manual_seed(self.seed)
        b, s, d = self.batch, self.seq_len, self.head_dim
        heads = (self.q_heads, self.kv_heads, self.kv_heads, self.q_heads)
        return tuple(torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for h in heads)

    def reference(self) -> list[Tensor]:
        """Float64 (out, dq, dk, dv) on the whole sequence."""
        return reference_gradients(*self.tensors(), self.mask, self.info(), self.scale)


def run_examples(rank: int, world_size: int, examples: list[Example]) -> list:
    """This rank's (out, dq, dk, dv) of each example."""
    return [_sharded_step(rank, e.make_layout(), e.tensors(), e.block_size, e.piece_rows, mask=e.mask,
                          info=e.info(), scale=e.scale) for e in examples]


# ------------------------------------------------------------------------------ non-finite keys

POISON = (float("nan"), float("inf"), float("-inf"))


def poison(t: Tensor, keys: Tensor, shift: int = 0) -> Tensor:
    """``t`` [B, H, S, D] with NaN, +Inf and -Inf (cycling along D) at keys [B, S] (bool)."""
    values = torch.tensor(POISON, dtype=t.dtype).roll(shift).repeat(t.shape[-1])[: t.shape[-1]]
    return torch.where(keys[:, None, :, None], values, t)


def padding_keys(case: Case) -> Tensor:
    """[B, S] bool: the case's padding keys."""
    return case.metadata().padding


def run_poisoned(rank: int, world_size: int, cases: list[Case], layout_kind: str, where: str) -> list:
    """Per case, this rank's (out, dq, dk, dv) with K and V poisoned at ``where``: "none",
    "padding" (every padding key) or "key:<j>" (global key j in every batch row)."""
    results = []
    for case in cases:
        q, k, v, grad = make_tensors(case)
        if where == "padding":
            keys = padding_keys(case)
        elif where.startswith("key:"):
            keys = torch.zeros(case.batch, case.seq_len, dtype=torch.bool)
            keys[:, int(where[4:])] = True
        else:
            keys = None
        if keys is not None:
            k, v = poison(k, keys), poison(v, keys, shift=1)
        results.append(run_case(rank, world_size, case, layout_kind, (q, k, v, grad)))
    return results


# ------------------------------------------------------------------------------ counters


def causal_step_stats(rank: int, world_size: int):
    """Ring counters of one contiguous causal forward and backward (float32, B=1, Hkv=2, L=8, D=8)."""
    case = Case("causal", "none", torch.float32, seq_len=8 * world_size, batch=1)
    reset_ring_stats()
    run_case(rank, world_size, case, "contiguous")
    return ring_stats()


def exchange_traffic(rank: int, world_size: int, case: Case, layout_kind: str) -> tuple[int, int, int]:
    """(bytes this rank sent in one forward and backward of ``case``, the bytes the plans imply,
    K/V rows that some local query may see, summed over the other owners).

    The plans imply: every other rank's needed rows of this rank's chunk, sent forward and
    backward, and the dK/dV of the rows this rank read of other chunks, sent home (rows of whole
    key blocks for the flex kernel).
    """
    from ..kernels import KERNELS

    layout = Layout(layout_kind, world_size)
    info = case.metadata()
    mask = case.mask
    fields = (info or SequenceInfo(shape=(case.batch, case.seq_len))).tensors()  # as the op gets them
    ctx = plan_context(planner_spec(mask, torch.device("cpu")), layout, case.seq_len, torch.device("cpu"), *fields, block_size=case.block_size)
    rows = lambda runs: sum(b - a for a, b in runs)  # noqa: E731
    whole_blocks = KERNELS[case.kernel or "aten"].reads_whole_blocks
    needed_by_others = sum(rows(needed_kv_rows(ctx, reader, rank, whole_blocks))
                           for reader in range(world_size) if reader != rank)
    plans = [plan_pair(ctx, rank, owner, case.dtype) for owner in range(world_size) if owner != rank]
    read_of_others = sum(rows(plan.pair_rows if whole_blocks else plan.kv_rows) for plan in plans)
    row_bytes = 2 * case.batch * case.kv_heads * case.head_dim * torch.empty((), dtype=case.dtype).element_size()
    allowed = reference_mask(mask, info, case.batch, case.seq_len)  # [B, S, S]
    seen = allowed[:, layout.positions(case.seq_len, rank)].any(1).any(0)  # keys some local query may see
    lower = sum(int(seen[layout.positions(case.seq_len, owner)].sum()) for owner in range(world_size) if owner != rank)
    reset_ring_stats()
    run_case(rank, world_size, case, layout_kind)
    return ring_stats().bytes_sent, row_bytes * (2 * needed_by_others + read_of_others), lower


def _local_qkv(case: Case, layout: Layout, rank: int) -> list[Tensor]:
    """This rank's shard of the case's q, k, v."""
    return [layout.shard(t, 2, rank) for t in make_tensors(case)[:3]]


def mesh_matches_default_group(rank: int, world_size: int) -> float:
    """Max difference between ``group=<1-D DeviceMesh>`` and the default group."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    layout = Layout("zigzag", world_size)
    q, k, v = _local_qkv(Case("sliding", "none"), layout, rank)
    by_mesh = ring_attention(q, k, v, mask=SPECS["sliding"], layout=layout, group=mesh["cp"])
    by_default = ring_attention(q, k, v, mask=SPECS["sliding"], layout=layout)
    return float((by_mesh - by_default).abs().max())


def agreements_over_layers(rank: int, world_size: int) -> list[int]:
    """Agreements held by three layer calls (two masks) per batch, over two batches."""
    case = Case("sliding", "all", seq_len=8 * world_size)
    layout = Layout("zigzag", world_size)
    q, k, v = _local_qkv(case, layout, rank)
    counts = []
    for _ in range(2):
        info = make_info("all", case.batch, case.seq_len)
        reset_ring_stats()
        for spec in (SPECS["sliding"], SPECS["causal"], SPECS["sliding"]):
            ring_attention(q, k, v, mask=spec, info=info, layout=layout)
        counts.append(ring_stats().agreements)
    return counts



def disagreeing_flex_masks(rank: int, world_size: int) -> str:
    """The error each rank gets when one rank's FlexMask tensors differ from the others'."""
    q = torch.randn(1, 2, 8, 8)
    mask = FlexMask(presets.prefix_lm, prefix=torch.tensor(3 + (rank == world_size - 1)))
    try:
        ring_attention(q, q, q, mask=mask)
    except ValueError as e:
        return str(e)
    return "no error"
