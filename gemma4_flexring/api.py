"""What users call."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.gemma4_flexring.*)
from .comm import group_size, process_group
from .info import SequenceInfo
from .layout import Layout
from .planning.flexmask import FlexMask
from .planning.masks import MaskSpec
from .prepare import mask_arguments
from .validate import fail_together


def argument_problems(q, k, v, mask, info, layout, scale, world_size: int,
                      kernel=None) -> list[tuple[type[Exception], str]]:
    """What is wrong with ``ring_attention``'s arguments before the op can be called:
    (exception type when alone, sentence) pairs; empty when fine."""
    problems: list[tuple[type[Exception], str]] = []
    for name, t in zip("qkv", (q, k, v)):
        if not isinstance(t, Tensor):
            problems.append((TypeError, f"{name} must be a Tensor, got {type(t).__name__}"))
    if not problems and not (q.device == k.device == v.device):
        # Checked here: with a meta tensor among them, the op would dispatch to its fake kernel.
        problems.append((ValueError, f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"))
    if mask is not None and not isinstance(mask, (MaskSpec, FlexMask)):
        problems.append((TypeError, f"mask must be a MaskSpec or a FlexMask, got {type(mask).__name__}"))
    if info is not None and not isinstance(info, SequenceInfo):
        problems.append((TypeError, f"info must be a SequenceInfo or None, got {type(info).__name__}"))
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        problems.append((TypeError, f"scale must be a number or None, got {type(scale).__name__}"))
    if kernel is not None and not isinstance(kernel, str):
        problems.append((TypeError, f"kernel must be a str or None, got {type(kernel).__name__}"))
    if layout is not None and not isinstance(layout, Layout):
        problems.append((TypeError, f"layout must be a Layout, got {type(layout).__name__}"))
    elif layout is not None and layout.world_size != world_size:
        problems.append((ValueError, f"layout is for {layout.world_size} ranks, the group has {world_size}"))
    elif layout is not None and layout.permutation is None and not problems and q.dim() == 4:
        # A fixed kind's table is built here, so its length is checked here; a table layout's
        # length is checked in the op (comparing it here would guard on it).
        try:
            layout.check_length(q.shape[2] * world_size)
        except ValueError as e:
            problems.append((ValueError, str(e)))
    return problems


def ring_attention(q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec | FlexMask | None = None,
                   info: SequenceInfo | None = None, layout: Layout | None = None, group=None,
                   scale: float | None = None, kernel: str | None = None) -> Tensor:
    """Exact context-parallel attention of this rank's queries against the whole sequence.

    Shapes (P ranks, S = P * L):
        q: [B, Hq, L, D], this rank's queries in ``layout`` order.
        k, v: [B, Hkv, L, D], this rank's keys and values; Hq % Hkv == 0.
        returns: [B, Hq, L, D], q's dtype, differentiable w.r.t. q, k, v.

    Args:
        mask: the layer's MaskSpec (default: causal, no window), or a FlexMask (any mask_mod
            over global positions; ANDed with ``info``'s documents and padding).
        info: whole-sequence metadata (documents, image blocks, padding), the same on every rank.
        layout: how the sequence is sharded (default: contiguous over the group); a balanced
            layout (``Layout.balanced``) reaches the op as a tensor, so a new one every batch
            does not recompile a compiled model.
        group: a ProcessGroup, a 1-D DeviceMesh, or None (default group; a world of one when
            torch.distributed is not initialized).
        scale: score scale, default ``D ** -0.5`` (Gemma 4 uses 1.0).
        kernel: the chunk kernel: None picks by device (flex on CUDA, aten on CPU); "aten"
            (CPU flash attention) or "flex" (FlexAttention: compiled on CUDA, eager and slow on
            CPU, for tests). A name that is unknown or cannot serve q's device raises on every rank.

    Raises:
        ValueError: on every rank of the group, before any exchange, when any rank's arguments
            are wrong (types, devices, a layout for another world size, shapes, dtypes, ...) or
            ranks disagree (shapes, masks, layouts, scale, metadata content). In a world of one,
            a wrong argument type raises TypeError. A ``group`` that is not a group raises
            TypeError on this rank alone (it names no peers to tell).
    """
    # The group object, not its name, gives the size: dynamo traces ProcessGroup methods (constant
    # per group) but not the C++ name lookup ``_resolve_process_group``.
    pg = process_group(group)
    name = "" if pg is None else pg.group_name
    world_size = group_size(pg)
    problems = argument_problems(q, k, v, mask, info, layout, scale, world_size, kernel)
    if problems:
        fail_together(problems, pg)
    mask = MaskSpec() if mask is None else mask
    layout = Layout("contiguous", world_size) if layout is None else layout
    if info is None:  # a wrongly shaped q gets a stand-in; the op reports it on every rank
        shape = (q.shape[0], q.shape[2] * world_size) if q.dim() == 4 else (1, 1)
        info = SequenceInfo(shape=shape, device=q.device)
    scale = None if scale is None else float(scale)
    # The layout as a tensor (rank-major global positions, [S]), for every kind: a balanced layout
    # that changes every batch is then a graph input, not a guard.
    table = layout.table(q.shape[2] * world_size) if q.dim() == 4 else torch.zeros(0, dtype=torch.int64)
    out, _ = torch.ops.gemma4_flexring.ring_attention(
        q, k, v, info.generation, *(t.to(q.device) for t in info.tensors()), table, group_name=name, scale=scale,
        kernel_name=kernel or "", **mask_arguments(mask, q.device))
    return out
