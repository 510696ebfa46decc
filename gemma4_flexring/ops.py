"""The package's custom ops: the only place that touches ``torch.library``.

- ``gemma4_flexring::ring_attention`` returns ``(out, lse)``; its autograd formula calls
  ``gemma4_flexring::ring_attention_backward`` with the saved merged out and lse, whose own
  autograd formula raises (no double backward).
- ``gemma4_flexring::new_generation`` hands out ``SequenceInfo`` generations; as an opaque op it
  runs at every call of compiled and exported code instead of being traced into a constant.

Process groups travel by name. Masks are rebuilt inside the op from plain tensors and scalars
(a BlockMask cannot be an op argument) and cached under the metadata's digest (``cache.py``).
Every metadata tensor is always present, whatever the batch holds, so the op's inputs have one
structure for every batch and a compiled graph never guards on what a batch contains. The layout
arrives the same way, for every kind: ``layout`` is an int64 [S] tensor, every rank's global
positions in local order, rank-major (``Layout.table``). The op rebuilds the layout's segments
from it, and its content digest joins the plans' cache key; a balanced layout that changes every
batch is thus one more tensor input, never a guard.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import generations
from .planning import schedule
from .testing import simulated
from .planning.cache import MASK_CACHE
from .exchange import Exchange, build_exchange, piece_rows
from .kernels import ChunkKernel, kernel_for
from .layout import Layout
from .planning.masks import MaskSpec
from .merge import accumulator_dtype
from .planning.metadata import Metadata
from .ring import RingComm, ring_backward, ring_forward
from .testing.simulated import SimulatedComm, SimulatedGroup
from .validate import check_inputs_once, local_problems, signature


class RingArgs(NamedTuple):
    """The forward op's arguments, by name (shared by the op, its autograd and its backward)."""

    q: Tensor
    k: Tensor
    v: Tensor
    generation: Tensor
    document_ids: Tensor
    block_ids: Tensor
    padding: Tensor
    layout: Tensor
    causal: bool
    sliding_window: int | None
    block_bidirectional: bool
    group_name: str
    scale: float | None
    kernel_name: str = ""

    @property
    def info(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.document_ids, self.block_ids, self.padding

    @property
    def options(self) -> tuple:
        """The non-tensor arguments, in schema order."""
        return self[len(self) - 6:]

    @property
    def resolved_scale(self) -> float:
        return self.q.shape[-1] ** -0.5 if self.scale is None else self.scale


def resolve_group(group_name: str) -> dist.ProcessGroup | SimulatedGroup | None:
    """The process group named ``group_name`` (or a simulated one); "" is a world of one."""
    if not group_name:
        return None
    return simulated.lookup(group_name) or dist.distributed_c10d._resolve_process_group(group_name)


def communicator(group: dist.ProcessGroup | SimulatedGroup | None) -> RingComm | SimulatedComm:
    return SimulatedComm(group) if isinstance(group, SimulatedGroup) else RingComm(group)


class Planning(NamedTuple):
    """What every plan and exchange schedule of one call is derived from (the cache keys too)."""

    spec: MaskSpec
    meta: Metadata
    metadata: tuple[Tensor | None, Tensor | None, Tensor | None]  # the fields that matter
    layout: Layout
    layout_digest: bytes
    seq_len: int
    batch: int  # of the masks: 1 when no metadata matters

    def key(self, *parts, q: Tensor) -> tuple:
        return (self.spec, self.layout_digest, self.seq_len, *parts, self.batch, q.dtype, q.device,
                schedule.BLOCK_SIZE)


def _planning(args: RingArgs, layout_digest: bytes, layout: Layout, comm) -> Planning:
    meta = MASK_CACHE.metadata(int(args.generation), args.info)
    return Planning(MaskSpec(args.causal, args.sliding_window, args.block_bidirectional), meta,
                    meta.effective(*args.info), layout, layout_digest, args.q.shape[2] * comm.world_size,
                    args.q.shape[0] if meta.any else 1)


def _plans(args: RingArgs, p: Planning, comm) -> list[schedule.PairPlan]:
    """This rank's plan against every K/V owner, from the cache under the metadata's digest."""
    q = args.q

    def plan(owner: int) -> schedule.PairPlan:
        return MASK_CACHE.plan(p.meta, p.key(comm.rank, owner, q=q), lambda: schedule.plan_pair(
            p.spec, *p.metadata, p.layout, p.seq_len, comm.rank, owner, p.batch, q.dtype, q.device))

    return [plan(owner) for owner in range(comm.world_size)]


class Prepared(NamedTuple):
    """What one call of either op needs besides its tensors."""

    comm: RingComm | SimulatedComm
    kernel: ChunkKernel
    exchange: Exchange  # what this rank sends and receives at each step
    key_padding: Tensor | None  # [B, L] bool: this rank's padding keys, None when there are none


def _exchange(args: RingArgs, p: Planning, comm, plans: list[schedule.PairPlan], kernel: ChunkKernel) -> Exchange:
    """This rank's exchange schedule (``exchange.py``), from the cache under the metadata's digest:
    what it receives from its plans (as ``kernel`` runs them: ``kernel_plans``), what it sends from
    every query rank's needs against its chunk. A kernel reading whole key blocks gets their rows,
    in one piece per step (its calls are not cut)."""
    whole_blocks = kernel.reads_whole_blocks

    def build() -> Exchange:
        send_rows = [() if reader == comm.rank else schedule.needed_kv_rows(
            p.spec, *p.metadata, p.layout, p.seq_len, reader, comm.rank, p.batch, args.q.device,
            whole_blocks=whole_blocks) for reader in range(comm.world_size)]
        return build_exchange(comm.rank, comm.world_size, plans, send_rows, chunk, most_rows)

    chunk = args.q.shape[2]
    most_rows = None if whole_blocks else piece_rows(chunk, args.q.dtype)
    return MASK_CACHE.schedule(p.meta, ("exchange", whole_blocks, most_rows, *p.key(comm.rank, q=args.q)), build)


def _planned(args: RingArgs, p: Planning, comm, kernel: ChunkKernel) -> Prepared:
    """Plans, exchange schedule and key padding of one call."""
    plans = kernel_plans(_plans(args, p, comm), kernel)
    key_padding = p.layout.shard(args.padding, 1, comm.rank) if p.meta.padding else None
    return Prepared(comm, kernel, _exchange(args, p, comm, plans, kernel), key_padding)


def _prepare(args: RingArgs, check: bool) -> Prepared:
    """Communicator, kernel, exchange schedule and key padding for one call.

    With ``check``, the inputs are validated and the plans built *before* the ranks agree, so
    that any failure, planning included, raises on every rank before the first exchange.
    """
    comm = communicator(resolve_group(args.group_name))
    kernel = kernel_for(args.q.device, args.kernel_name)
    if not check:
        return _planned(args, _planning(args, *MASK_CACHE.layout(args.layout, comm.world_size), comm), comm, kernel)
    problems = local_problems(args.q, args.k, args.v, args.info, args.sliding_window, args.layout,
                              comm.world_size, args.scale, args.kernel_name)
    prepared = layout = None
    if not problems:
        try:
            layout = MASK_CACHE.layout(args.layout, comm.world_size)
        except ValueError as e:
            problems.append(str(e))
    if not problems:
        try:
            planning = _planning(args, *layout, comm)
            prepared = _planned(args, planning, comm, kernel)
        except Exception as e:  # noqa: BLE001 - reported on every rank by check_inputs
            problems.append(f"planning the ring's masks failed: {type(e).__name__}: {e}")
    mine = None if problems else signature(args.q, args.k, planning.meta, args.causal, args.sliding_window,
                                           args.block_bidirectional, planning.layout_digest, args.resolved_scale)
    key = (args.group_name, int(args.generation), None if mine is None else tuple(mine))
    check_inputs_once(key, problems, comm.group, lambda: mine)
    return prepared


def kernel_plans(plans: list[schedule.PairPlan], kernel: ChunkKernel) -> list[schedule.PairPlan]:
    """The plans as ``kernel`` runs them: ``tiles`` holding its own calls (dense tiles for aten,
    segment pairs with their BlockMasks for flex; the ring and the exchange run whatever calls
    ``tiles`` holds) and ``kv_rows`` the rows they read."""
    return [plan._replace(tiles=kernel.calls(plan), kv_rows=plan.pair_rows if kernel.reads_whole_blocks
                          else plan.kv_rows) for plan in plans]


@torch.library.custom_op("gemma4_flexring::ring_attention", mutates_args=())
def ring_attention_op(q: Tensor, k: Tensor, v: Tensor, generation: Tensor, document_ids: Tensor,
                      block_ids: Tensor, padding: Tensor, layout: Tensor, causal: bool,
                      sliding_window: int | None, block_bidirectional: bool, group_name: str,
                      scale: float | None, kernel_name: str = "") -> tuple[Tensor, Tensor]:
    """Ring attention over the group: (out [B, Hq, L, D], lse [B, Hq, L] float64).

    Metadata tensors are the whole sequence's, [B, S]; ``layout`` is int64 [S], every rank's
    global positions in local order, rank-major (``Layout.table``); ``scale`` None means
    ``D ** -0.5``; ``kernel_name`` names the chunk kernel ("" = the device's default, see
    ``kernels``; not ``kernel``, which inductor's fallback lowering takes as its own argument).
    """
    args = RingArgs(q, k, v, generation, document_ids, block_ids, padding, layout, causal, sliding_window,
                    block_bidirectional, group_name, scale, kernel_name)
    comm, kernel, exchange, key_padding = _prepare(args, check=True)
    return ring_forward(q, k, v, comm, kernel, args.resolved_scale, exchange, key_padding)


@ring_attention_op.register_fake
def _(q, k, v, generation, document_ids, block_ids, padding, layout, causal, sliding_window,
      block_bidirectional, group_name, scale, kernel_name=""):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("ring_attention: q, k, v must be 4-D [B, H, S_local, D]")
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=accumulator_dtype(q.dtype))


@torch.library.custom_op("gemma4_flexring::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                               lse: Tensor, generation: Tensor, document_ids: Tensor,
                               block_ids: Tensor, padding: Tensor, layout: Tensor, causal: bool,
                               sliding_window: int | None, block_bidirectional: bool,
                               group_name: str, scale: float | None,
                               kernel_name: str = "") -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of ``ring_attention`` from its saved out and lse."""
    args = RingArgs(q, k, v, generation, document_ids, block_ids, padding, layout, causal, sliding_window,
                    block_bidirectional, group_name, scale, kernel_name)
    comm, kernel, exchange, key_padding = _prepare(args, check=False)
    return ring_backward(grad_out, q, k, v, out, lse, comm, kernel, args.resolved_scale, exchange,
                         key_padding)


@ring_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, generation, document_ids, block_ids, padding, layout, causal,
      sliding_window, block_bidirectional, group_name, scale, kernel_name=""):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    args = RingArgs(*inputs)
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(args.q, args.k, args.v, out, lse, args.generation, *args.info, args.layout)
    ctx.options = args.options


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    q, k, v, out, lse, generation, document_ids, block_ids, padding, layout = ctx.saved_tensors
    dq, dk, dv = torch.ops.gemma4_flexring.ring_attention_backward(
        grad_out, q, k, v, out, lse, generation, document_ids, block_ids, padding, layout, *ctx.options)
    return dq, dk, dv, *([None] * (len(RingArgs._fields) - 3))


ring_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("gemma4_flexring: double backward (a gradient of ring_attention's gradient, e.g. "
                       "torch.autograd.grad(..., create_graph=True) followed by another backward) is not "
                       "supported")


ring_attention_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


@torch.library.custom_op("gemma4_flexring::new_generation", mutates_args=())
def new_generation(like: Tensor) -> Tensor:
    """A fresh generation: int64 scalar on the CPU (``like`` only anchors the op to a device)."""
    return torch.tensor(generations.next_generation(), dtype=torch.int64)


@new_generation.register_fake
def _(like):
    return torch.empty((), dtype=torch.int64)


# Each call must run (and run again): no dead-code elimination, no common-subexpression merging.
torch.fx.node.has_side_effect(torch.ops.gemma4_flexring.new_generation.default)
