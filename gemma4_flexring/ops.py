"""The package's custom ops: the only place that touches ``torch.library``.

- ``gemma4_flexring::ring_attention`` returns ``(out, lse)``; its autograd formula calls
  ``gemma4_flexring::ring_attention_backward`` with the saved merged out and lse, whose own
  autograd formula raises (no double backward).
- ``gemma4_flexring::new_generation`` hands out ``SequenceInfo`` generations; as an opaque op it
  runs at every call of compiled and exported code instead of being traced into a constant.

Process groups travel by name. Masks are rebuilt inside the op from plain tensors and scalars
(a BlockMask cannot be an op argument; ``prepare.py`` plans each call) and cached under the
metadata's digest (``planning/cache.py``); a ``FlexMask`` travels as its factory's name and its
tensors (``planning/flexmask.py``).
Every metadata tensor is always present, whatever the batch holds, so the op's inputs have one
structure for every batch and a compiled graph never guards on what a batch contains. The layout
arrives the same way, for every kind: ``layout`` is an int64 [S] tensor, every rank's global
positions in local order, rank-major (``Layout.table``). The op rebuilds the layout's segments
from it, and its content digest joins the plans' cache key; a balanced layout that changes every
batch is thus one more tensor input, never a guard.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import generations
from .merge import LSE_DTYPE
from .prepare import RingArgs, prepare
from .ring import ring_backward, ring_forward


@torch.library.custom_op("gemma4_flexring::ring_attention", mutates_args=())
def ring_attention_op(q: Tensor, k: Tensor, v: Tensor, generation: Tensor, document_ids: Tensor,
                      block_ids: Tensor, padding: Tensor, layout: Tensor, mask_tensors: Sequence[Tensor],
                      causal: bool, sliding_window: int | None, block_bidirectional: bool, group_name: str,
                      scale: float | None, kernel_name: str, mask_name: str,
                      mask_generation: Tensor | None) -> tuple[Tensor, Tensor]:
    """Ring attention over the group: (out [B, Hq, L, D], lse [B, Hq, L] float64).

    Metadata tensors are the whole sequence's, [B, S]; ``layout`` is int64 [S], every rank's
    global positions in local order, rank-major (``Layout.table``); ``scale`` None means
    ``D ** -0.5``; ``kernel_name`` names the chunk kernel ("" = the device's default, see
    ``kernels``; not ``kernel``, which inductor's fallback lowering takes as its own argument).
    No argument has a default: the op's autograd must see every argument given, in every call.
    The mask is ``causal`` / ``sliding_window`` / ``block_bidirectional`` (a ``MaskSpec``) when
    ``mask_name`` is "", else a ``FlexMask``: ``mask_name`` its ``op_name``, ``mask_tensors``
    its tensors (empty for a ``MaskSpec``), ``mask_generation`` its generation.
    """
    args = RingArgs(q, k, v, generation, document_ids, block_ids, padding, layout, mask_tensors, causal,
                    sliding_window, block_bidirectional, group_name, scale, kernel_name, mask_name, mask_generation)
    comm, kernel, exchange, key_padding = prepare(args, check=True)
    return ring_forward(q, k, v, comm, kernel, args.resolved_scale, exchange, key_padding)


@ring_attention_op.register_fake
def _(q, k, v, generation, document_ids, block_ids, padding, layout, mask_tensors, causal, sliding_window,
      block_bidirectional, group_name, scale, kernel_name, mask_name, mask_generation):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("ring_attention: q, k, v must be 4-D [B, H, S_local, D]")
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=LSE_DTYPE)


@torch.library.custom_op("gemma4_flexring::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                               lse: Tensor, generation: Tensor, document_ids: Tensor,
                               block_ids: Tensor, padding: Tensor, layout: Tensor,
                               mask_tensors: Sequence[Tensor], causal: bool,
                               sliding_window: int | None, block_bidirectional: bool,
                               group_name: str, scale: float | None, kernel_name: str,
                               mask_name: str, mask_generation: Tensor | None
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of ``ring_attention`` from its saved out and lse."""
    args = RingArgs(q, k, v, generation, document_ids, block_ids, padding, layout, mask_tensors, causal,
                    sliding_window, block_bidirectional, group_name, scale, kernel_name, mask_name, mask_generation)
    comm, kernel, exchange, key_padding = prepare(args, check=False)
    return ring_backward(grad_out, q, k, v, out, lse, comm, kernel, args.resolved_scale, exchange,
                         key_padding)


@ring_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, generation, document_ids, block_ids, padding, layout, mask_tensors, causal,
      sliding_window, block_bidirectional, group_name, scale, kernel_name, mask_name, mask_generation):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    args = RingArgs(*inputs)
    out, lse = output
    ctx.mark_non_differentiable(lse)
    # The FlexMask's tensors (and its generation, when given) follow the fixed ones.
    extra = [*args.mask_tensors] + ([] if args.mask_generation is None else [args.mask_generation])
    ctx.save_for_backward(args.q, args.k, args.v, out, lse, args.generation, *args.info, args.layout, *extra)
    ctx.mask_count = len(args.mask_tensors)
    ctx.options = args.options


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    q, k, v, out, lse, generation, document_ids, block_ids, padding, layout, *extra = ctx.saved_tensors
    mask_tensors, mask_generation = extra[:ctx.mask_count], (extra[ctx.mask_count:] or [None])[0]
    dq, dk, dv = torch.ops.gemma4_flexring.ring_attention_backward(
        grad_out, q, k, v, out, lse, generation, document_ids, block_ids, padding, layout, mask_tensors,
        *ctx.options, mask_generation)
    fixed = RingArgs._fields.index("mask_tensors")  # no gradient for anything but q, k, v
    return dq, dk, dv, *([None] * (fixed - 3)), [None] * ctx.mask_count, *([None] * (len(RingArgs._fields) - fixed - 1))


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
