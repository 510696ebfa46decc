"""Gemma 4 attention masks as flex ``mask_mod`` functions.

Every mask here is a pure function ``mask_mod(b, h, i, j) -> bool`` over *global* sequence
positions (query ``i``, key ``j``), composed from small factories with ``and_masks`` /
``or_masks`` as in attention-gym. For batch row ``b``::

    allowed = window(i, j) and (order(i, j) or block(b, i, j)) and doc(b, i, j) and not padding[b, j]
    order   = j <= i                        if causal else True
    window  = j > i - W  if causal, |i - j| <= W if not causal, True if W is None
    block   = block_bidirectional and block_ids[b, i] >= 0 and block_ids[b, i] == block_ids[b, j]
    doc     = document_ids[b, i] == document_ids[b, j]   (True without document_ids)

The functions broadcast: the planner (``schedule.evaluate_mask``) evaluates them on index
grids directly, and they work under flex's vmapped ``create_block_mask`` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import and_masks, or_masks

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class MaskSpec:
    """The per-layer part of a Gemma 4 mask.

    Args:
        causal: keys after the query are hidden (``j <= i``).
        sliding_window: ``W`` of a sliding layer, or None for a global layer.
        block_bidirectional: tokens of one image block see each other both ways (Gemma 4 sliding
            layers with ``use_bidirectional_attention == "vision"``); needs ``SequenceInfo.block_ids``.
    """

    causal: bool = True
    sliding_window: int | None = None
    block_bidirectional: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.causal, bool):
            raise TypeError(f"MaskSpec.causal must be a bool, got {type(self.causal).__name__}")
        if not isinstance(self.block_bidirectional, bool):
            raise TypeError(
                f"MaskSpec.block_bidirectional must be a bool, got {type(self.block_bidirectional).__name__}"
            )
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"MaskSpec.sliding_window must be None or a positive int, got {window!r}")


def causal_mask_mod(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
    return j <= i


def sliding_window(window: int, causal: bool) -> MaskMod:
    """Keys within ``window`` of the query: ``j > i - W`` when causal, else ``|i - j| <= W``."""

    def causal_window(b, h, i, j):
        return j > i - window

    def symmetric_window(b, h, i, j):
        return (i - j).abs() <= window

    fn = causal_window if causal else symmetric_window
    fn.__name__ = f"sliding_window_{window}{'_causal' if causal else ''}"
    return fn


def same_block(block_ids: Tensor) -> MaskMod:
    """Query and key in the same image block (``block_ids`` [B, S], -1 for text)."""

    def fn(b, h, i, j):
        query_block = block_ids[b, i]
        return (query_block >= 0) & (query_block == block_ids[b, j])

    return fn


def same_document(document_ids: Tensor) -> MaskMod:
    """Query and key in the same packed document (``document_ids`` [B, S])."""

    def fn(b, h, i, j):
        return document_ids[b, i] == document_ids[b, j]

    return fn


def not_padding(padding: Tensor) -> MaskMod:
    """Key is not padding (``padding`` [B, S], True = padding)."""

    def fn(b, h, i, j):
        return ~padding[b, j]

    return fn


def gemma4_mask_mod(
    spec: MaskSpec,
    document_ids: Tensor | None = None,
    block_ids: Tensor | None = None,
    padding: Tensor | None = None,
) -> MaskMod | None:
    """The whole Gemma 4 mask over global positions; None when every pair is allowed."""
    order = causal_mask_mod if spec.causal else None
    if spec.block_bidirectional and block_ids is not None and order is not None:
        order = or_masks(order, same_block(block_ids))
    parts = [order]
    if spec.sliding_window is not None:
        parts.append(sliding_window(spec.sliding_window, spec.causal))
    if document_ids is not None:
        parts.append(same_document(document_ids))
    if padding is not None:
        parts.append(not_padding(padding))
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else and_masks(*parts)


def offset_mask_mod(mask_mod: MaskMod, q_start: int, kv_start: int) -> MaskMod:
    """``mask_mod`` seen from a tile whose first query / key sit at these global positions."""

    def fn(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + q_start, kv_idx + kv_start)

    return fn
