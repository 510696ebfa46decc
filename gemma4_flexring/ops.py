"""The package's custom ops: the only place that touches ``torch.library``.

``gemma4_flexring::ring_attention`` returns ``(out, lse)``; its autograd formula calls
``gemma4_flexring::ring_attention_backward`` with the saved merged out and lse. Process groups
travel by name; masks are rebuilt inside the op from plain tensors and scalars (a BlockMask
cannot be an op argument) and cached under the ``generation`` tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .cache import MASK_CACHE
from .kernels import ChunkKernel, kernel_for
from .layout import Layout
from .masks import MaskSpec, gemma4_mask_mod
from .merge import accumulator_dtype
from .ring import RingComm, local_key_padding, ring_backward, ring_forward
from . import schedule
from .validate import check_inputs, local_problems, signature


class RingArgs(NamedTuple):
    """The forward op's arguments, by name (shared by the op, its autograd and its backward)."""

    q: Tensor
    k: Tensor
    v: Tensor
    generation: Tensor
    document_ids: Tensor | None
    block_ids: Tensor | None
    padding: Tensor | None
    causal: bool
    sliding_window: int | None
    block_bidirectional: bool
    layout: str
    group_name: str
    scale: float

    @property
    def info(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.document_ids, self.block_ids, self.padding


def resolve_group(group_name: str) -> dist.ProcessGroup | None:
    """The process group named ``group_name``; "" is a world of one."""
    if not group_name:
        return None
    return dist.distributed_c10d._resolve_process_group(group_name)


def _plans(args: RingArgs, comm: RingComm) -> list[schedule.PairPlan]:
    """This rank's plan against every K/V owner, from the cache of ``args.generation``."""
    spec = MaskSpec(args.causal, args.sliding_window, args.block_bidirectional)
    layout = Layout(args.layout, comm.world_size)
    q = args.q
    seq_len = q.shape[2] * comm.world_size
    batch = q.shape[0] if any(t is not None for t in args.info) else 1
    generation = int(args.generation)

    def plan(owner: int) -> schedule.PairPlan:
        key = (spec, layout, seq_len, comm.rank, owner, batch, q.dtype, q.device, schedule.BLOCK_SIZE)
        build = lambda: schedule.plan_pair(gemma4_mask_mod(spec, *args.info), layout, seq_len,  # noqa: E731
                                           comm.rank, owner, batch, q.dtype, q.device)
        return MASK_CACHE.get(generation, key, build)

    return [plan(owner) for owner in range(comm.world_size)]


def _prepare(args: RingArgs, check: bool) -> tuple[RingComm, list[schedule.PairPlan], ChunkKernel]:
    """Communicator, plans (one per K/V owner) and kernel for one call.

    With ``check``, the inputs are validated and the plans built *before* the ranks agree, so
    that any failure, planning included, raises on every rank before the first exchange.
    """
    comm = RingComm(resolve_group(args.group_name))
    kernel = kernel_for(args.q.device)
    if not check:
        return comm, _plans(args, comm), kernel
    problems = local_problems(args.q, args.k, args.v, args.info, args.sliding_window, args.layout,
                              comm.world_size)
    plans: list[schedule.PairPlan] = []
    if not problems:
        try:
            plans = _plans(args, comm)
        except Exception as e:  # noqa: BLE001 - reported on every rank by check_inputs
            problems.append(f"planning the ring's masks failed: {type(e).__name__}: {e}")
    check_inputs(problems, comm.group, lambda: signature(
        args.q, args.k, args.info, args.causal, args.sliding_window, args.block_bidirectional, args.layout,
        args.scale, bool(problems)))
    return comm, plans, kernel


@torch.library.custom_op("gemma4_flexring::ring_attention", mutates_args=())
def ring_attention_op(q: Tensor, k: Tensor, v: Tensor, generation: Tensor, document_ids: Tensor | None,
                      block_ids: Tensor | None, padding: Tensor | None, causal: bool,
                      sliding_window: int | None, block_bidirectional: bool, layout: str,
                      group_name: str, scale: float) -> tuple[Tensor, Tensor]:
    """Ring attention over the group: (out [B, Hq, L, D], lse [B, Hq, L] float64)."""
    args = RingArgs(q, k, v, generation, document_ids, block_ids, padding, causal, sliding_window,
                    block_bidirectional, layout, group_name, scale)
    comm, plans, kernel = _prepare(args, check=True)
    return ring_forward(q, k, v, plans, comm, kernel, scale, local_key_padding(padding, layout, comm))


@ring_attention_op.register_fake
def _(q, k, v, generation, document_ids, block_ids, padding, causal, sliding_window,
      block_bidirectional, layout, group_name, scale):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("ring_attention: q, k, v must be 4-D [B, H, S_local, D]")
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=accumulator_dtype(q.dtype))


@torch.library.custom_op("gemma4_flexring::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                               lse: Tensor, generation: Tensor, document_ids: Tensor | None,
                               block_ids: Tensor | None, padding: Tensor | None, causal: bool,
                               sliding_window: int | None, block_bidirectional: bool, layout: str,
                               group_name: str, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of ``ring_attention`` from its saved out and lse."""
    args = RingArgs(q, k, v, generation, document_ids, block_ids, padding, causal, sliding_window,
                    block_bidirectional, layout, group_name, scale)
    comm, plans, kernel = _prepare(args, check=False)
    return ring_backward(grad_out, q, k, v, out, lse, plans, comm, kernel, scale,
                         local_key_padding(padding, layout, comm))


@ring_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, generation, document_ids, block_ids, padding, causal,
      sliding_window, block_bidirectional, layout, group_name, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    args = RingArgs(*inputs)
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(args.q, args.k, args.v, out, lse, args.generation, *args.info)
    ctx.options = (args.causal, args.sliding_window, args.block_bidirectional, args.layout,
                   args.group_name, args.scale)


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    q, k, v, out, lse, generation, document_ids, block_ids, padding = ctx.saved_tensors
    dq, dk, dv = torch.ops.gemma4_flexring.ring_attention_backward(
        grad_out, q, k, v, out, lse, generation, document_ids, block_ids, padding, *ctx.options)
    return dq, dk, dv, *([None] * (len(RingArgs._fields) - 3))


ring_attention_op.register_autograd(_backward, setup_context=_setup_context)
