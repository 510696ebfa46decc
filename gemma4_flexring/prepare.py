"""What one call of the ring op needs besides its tensors: the communicator, the kernel, the
exchange schedule and the key padding, from the call's planning context.

With ``check`` (the forward), the inputs are validated and everything is planned *before* the
ranks agree (``validate.check_inputs_once``), so that any failure, planning included, raises on
every rank before the first exchange. The backward re-derives the same objects from the cache.

Plans and schedules are cached under the metadata's content digest (``planning/cache.py``):
every layer of a batch, forward and backward, reuses them.

Shape legend: B batch rows, H heads, L local rows, S = P * L whole length, D head dim.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from torch import Tensor

from .comm import Communicator, communicator, resolve_group
from .exchange import Exchange, build_exchange, piece_rows
from .kernels import ChunkKernel, kernel_for
from .planning.cache import MASK_CACHE
from .planning.context import PlanContext, plan_context
from .planning.flexmask import FlexMask, FlexSpec
from .planning.masks import MaskSpec
from .planning.metadata import Metadata
from .planning.plan import CallPlan, needed_kv_rows, plan_pair
from .validate import check_inputs_once, local_problems, signature


class RingArgs(NamedTuple):
    """The forward op's arguments, by name and in schema order (the op, its autograd and its
    backward all unpack them here)."""

    q: Tensor  # [B, Hq, L, D]
    k: Tensor  # [B, Hkv, L, D]
    v: Tensor  # [B, Hkv, L, D]
    generation: Tensor  # int64 scalar
    document_ids: Tensor  # [B, S]
    block_ids: Tensor  # [B, S]
    padding: Tensor  # [B, S] bool
    layout: Tensor  # int64 [S], rank-major global positions
    mask_tensors: Sequence[Tensor]  # a FlexMask's tensors, in its op_name's order; empty for a MaskSpec
    causal: bool
    sliding_window: int | None
    block_bidirectional: bool
    group_name: str
    scale: float | None
    kernel_name: str
    mask_name: str  # a FlexMask's op_name; "" for a MaskSpec
    mask_generation: Tensor | None  # a FlexMask's generation

    @property
    def info(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.document_ids, self.block_ids, self.padding

    @property
    def options(self) -> tuple:
        """The non-tensor arguments, in schema order."""
        return (self.causal, self.sliding_window, self.block_bidirectional, self.group_name, self.scale,
                self.kernel_name, self.mask_name)

    def spec(self) -> MaskSpec | FlexSpec:
        """The layer's mask as the planner keys it (a FlexMask's factory is called and its tensors
        hashed once per generation, ``PlanCache.flex``); called once ``local_problems`` found its
        arguments whole (a FlexMask's generation present)."""
        if not self.mask_name:
            return MaskSpec(self.causal, self.sliding_window, self.block_bidirectional)
        return MASK_CACHE.flex(int(self.mask_generation), self.mask_name, list(self.mask_tensors))

    @property
    def resolved_scale(self) -> float:
        return self.q.shape[-1] ** -0.5 if self.scale is None else self.scale


def mask_arguments(mask: MaskSpec | FlexMask, device) -> dict:
    """The op's mask arguments (``RingArgs`` fields, by name) for a ``MaskSpec`` or a ``FlexMask``
    (its tensors moved to ``device``)."""
    if isinstance(mask, FlexMask):
        return dict(mask_tensors=mask.op_tensors(device), causal=False, sliding_window=None,
                    block_bidirectional=False, mask_name=mask.op_name, mask_generation=mask.generation)
    return dict(mask_tensors=[], causal=mask.causal, sliding_window=mask.op_window,
                block_bidirectional=mask.block_bidirectional, mask_name="", mask_generation=None)


class Prepared(NamedTuple):
    """What one call of either op needs besides its tensors."""

    comm: Communicator
    kernel: ChunkKernel
    exchange: Exchange  # what this rank sends and receives at each step
    key_padding: Tensor | None  # [B, L] bool: this rank's padding keys, None when there are none


class _Call(NamedTuple):
    """One call's planning context, with what keys its cache entries."""

    ctx: PlanContext
    meta: Metadata
    layout_digest: bytes


def _context(args: RingArgs, layout_digest: bytes, layout, world_size: int) -> _Call:
    """The call's context: the metadata's relevance comes from its cached ``Metadata``."""
    meta = MASK_CACHE.metadata(int(args.generation), args.info)
    ctx = plan_context(args.spec(), layout, args.q.shape[2] * world_size, args.q.device, *args.info,
                       relevant=(meta.documents, meta.blocks, meta.padding))
    return _Call(ctx, meta, layout_digest)


def _call_plans(call: _Call, comm: Communicator, kernel: ChunkKernel, q: Tensor) -> list[CallPlan]:
    """This rank's plan against every K/V owner as ``kernel`` runs it; pair plans come from the
    cache under the metadata's digest."""
    ctx = call.ctx

    def plan(owner: int) -> CallPlan:
        pair = MASK_CACHE.plan(call.meta, ctx.key(call.layout_digest, comm.rank, owner, q.dtype),
                               lambda: plan_pair(ctx, comm.rank, owner, q.dtype))
        return kernel.view(pair)

    return [plan(owner) for owner in range(comm.world_size)]


def _exchange(call: _Call, comm: Communicator, kernel: ChunkKernel, plans: list[CallPlan], q: Tensor) -> Exchange:
    """This rank's exchange schedule (``exchange.py``), from the cache: what it receives from its
    own ``plans``, what it sends from every query rank's needs against its chunk. A kernel reading
    whole key blocks gets their rows, in one piece per step (its calls are not cut)."""
    ctx, whole_blocks, chunk = call.ctx, kernel.reads_whole_blocks, q.shape[2]
    most_rows = None if whole_blocks else piece_rows(chunk, q.dtype)

    def build() -> Exchange:
        send_rows = [() if reader == comm.rank else needed_kv_rows(ctx, reader, comm.rank, whole_blocks)
                     for reader in range(comm.world_size)]
        return build_exchange(comm.rank, comm.world_size, plans, send_rows, chunk, most_rows)

    key = ctx.key(call.layout_digest, "exchange", kernel.name, most_rows, comm.rank, q.dtype)
    return MASK_CACHE.exchange(call.meta, key, build)


def _planned(args: RingArgs, call: _Call, comm: Communicator, kernel: ChunkKernel) -> Prepared:
    plans = _call_plans(call, comm, kernel, args.q)
    key_padding = call.ctx.layout.shard(args.padding, 1, comm.rank) if call.meta.padding else None
    return Prepared(comm, kernel, _exchange(call, comm, kernel, plans, args.q), key_padding)


def plan_call(args: RingArgs, comm: Communicator) -> Prepared:
    """What ``prepare`` plans for ``args`` on ``comm``'s rank, without checks or agreement: the
    backward's lookup, and ``plan_ahead``'s thread (which gets the caller's communicator: a
    simulated rank is known by its thread)."""
    kernel = kernel_for(args.q.device, args.kernel_name)
    return _planned(args, _context(args, *MASK_CACHE.layout(args.layout, comm.world_size), comm.world_size),
                    comm, kernel)


def prepare(args: RingArgs, check: bool) -> Prepared:
    """Communicator, kernel, exchange schedule and key padding for one call (see the module doc)."""
    comm = communicator(resolve_group(args.group_name))
    if not check:
        return plan_call(args, comm)
    kernel = kernel_for(args.q.device, args.kernel_name)
    problems = local_problems(args.q, args.k, args.v, args.info, args.sliding_window, args.layout,
                              comm.world_size, args.scale, args.kernel_name,
                              (args.mask_name, args.mask_tensors, args.mask_generation))
    prepared = call = None
    if not problems:
        try:
            layout = MASK_CACHE.layout(args.layout, comm.world_size)
        except ValueError as e:
            problems.append(str(e))
    if not problems:
        try:
            call = _context(args, *layout, comm.world_size)
            prepared = _planned(args, call, comm, kernel)
        except Exception as e:  # noqa: BLE001 - reported on every rank by check_inputs
            problems.append(f"planning the ring's masks failed: {type(e).__name__}: {e}")
    flex_digest = call.ctx.spec.digest if call is not None and isinstance(call.ctx.spec, FlexSpec) else None
    mine = None if problems else signature(args.q, args.k, call.meta, args.causal, args.sliding_window,
                                           args.block_bidirectional, call.layout_digest, args.resolved_scale,
                                           flex_digest)
    key = (args.group_name, int(args.generation), None if mine is None else tuple(mine))
    check_inputs_once(key, problems, comm.group, lambda: mine)
    return prepared
