"""Gemma 4 attention masks, each as a flex ``mask_mod`` and as a block classifier.

Every mask here is a ``Mask``: a pure function ``mask_mod(b, h, i, j) -> bool`` over *global*
sequence positions (query ``i``, key ``j``), paired with ``classify``, which says for whole blocks
of queries and keys whether the mask there is empty, full or partial (``blocks.py``). Small
factories compose with ``all_of`` / ``any_of`` (AND / OR of the mask_mods, as flex's
``and_masks`` / ``or_masks``; minimum / maximum on the classes), as in attention-gym. For batch
row ``b``::

    allowed = window(i, j) and (order(i, j) or block(b, i, j)) and doc(b, i, j) and not padding[b, j]
    order   = j <= i                        if causal else True
    window  = j > i - W  if causal, |i - j| <= W if not causal, True if W is None
    block   = block_bidirectional and block_ids[b, i] >= 0 and block_ids[b, i] == block_ids[b, j]
    doc     = document_ids[b, i] == document_ids[b, j]   (True without document_ids)

The mask_mods broadcast: the planner evaluates them on index grids directly (inside partial
blocks only), and they work under flex's vmapped ``create_block_mask`` too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .blocks import Blocks, and_classes, equal_classes, key_classes, or_classes, order_classes, window_classes

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
Classifier = Callable[[Blocks, Blocks], Tensor]


class Mask(NamedTuple):
    """One mask two ways: ``mask_mod(b, h, i, j) -> bool`` entry by entry, and
    ``classify(query_blocks, key_blocks) -> int8 [B or 1, Qb, KVb]`` block by block (empty,
    partial or full: see ``blocks.py``), both over global positions."""

    mask_mod: MaskMod
    classify: Classifier


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

    @property
    def op_window(self) -> int | None:
        """The window as the op takes it (an int64): any window at least as long as a sequence can
        be means the same."""
        return None if self.sliding_window is None else min(self.sliding_window, 2**62)


def _mask(mask_mod: MaskMod, classify: Classifier, name: str) -> Mask:
    """A ``Mask`` whose mask_mod carries ``name``, as attention-gym's factories name theirs."""
    mask_mod.__name__ = name
    return Mask(mask_mod, classify)


def causal() -> Mask:
    """Keys at or before the query: ``j <= i``."""
    return _mask(lambda b, h, i, j: j <= i, order_classes, "causal")


def sliding_window(window: int, causal: bool) -> Mask:
    """Keys within ``window`` of the query: ``j > i - W`` when causal, else ``|i - j| <= W``."""

    def causal_window(b, h, i, j):
        return j > i - window

    def symmetric_window(b, h, i, j):
        return (i - j).abs() <= window

    return _mask(causal_window if causal else symmetric_window,
                 lambda q, k: window_classes(q, k, window, causal),
                 f"sliding_window_{window}{'_causal' if causal else ''}")


def same_block(block_ids: Tensor) -> Mask:
    """Query and key in the same image block (``block_ids`` [B, S], negative for text)."""

    def fn(b, h, i, j):
        query_block = block_ids[b, i]
        return (query_block >= 0) & (query_block == block_ids[b, j])

    # Text queries and text keys get values that match nothing on the other side.
    query_side = torch.where(block_ids >= 0, block_ids, -2)
    key_side = torch.where(block_ids >= 0, block_ids, -1)
    return _mask(fn, lambda q, k: equal_classes(q, k, query_side, key_side), "same_block")


def same_document(document_ids: Tensor) -> Mask:
    """Query and key in the same packed document (``document_ids`` [B, S])."""

    def fn(b, h, i, j):
        return document_ids[b, i] == document_ids[b, j]

    return _mask(fn, lambda q, k: equal_classes(q, k, document_ids, document_ids), "same_document")


def not_padding(padding: Tensor) -> Mask:
    """Key is not padding (``padding`` [B, S], True = padding)."""

    def fn(b, h, i, j):
        return ~padding[b, j]

    return _mask(fn, lambda q, k: key_classes(k, padding), "not_padding")


def all_of(*masks: Mask) -> Mask:
    """Allowed where every mask allows."""
    return Mask(_combined(torch.logical_and, [m.mask_mod for m in masks]),
                lambda q, k: and_classes(*(m.classify(q, k) for m in masks)))


def any_of(*masks: Mask) -> Mask:
    """Allowed where some mask allows."""
    return Mask(_combined(torch.logical_or, [m.mask_mod for m in masks]),
                lambda q, k: or_classes(*(m.classify(q, k) for m in masks)))


def _combined(op: Callable[[Tensor, Tensor], Tensor], mask_mods: list[MaskMod]) -> MaskMod:
    """The mask_mods folded with ``op`` (flex's ``and_masks`` / ``or_masks`` start from a constant
    and so pay one more pass over the entries, which planning evaluates by the million)."""

    def fn(b, h, q_idx, kv_idx):
        result = mask_mods[0](b, h, q_idx, kv_idx)
        for mask_mod in mask_mods[1:]:
            result = op(result, mask_mod(b, h, q_idx, kv_idx))
        return result

    return fn


def gemma4_mask(
    spec: MaskSpec,
    document_ids: Tensor | None = None,
    block_ids: Tensor | None = None,
    padding: Tensor | None = None,
) -> Mask | None:
    """The whole Gemma 4 mask over global positions; None when every pair is allowed."""
    order = causal() if spec.causal else None
    if spec.block_bidirectional and block_ids is not None and order is not None:
        order = any_of(order, same_block(block_ids))
    window = None if spec.sliding_window is None else sliding_window(spec.sliding_window, spec.causal)
    return with_metadata([order, window], document_ids, padding)


def with_metadata(parts: list[Mask | None], document_ids: Tensor | None = None,
                  padding: Tensor | None = None) -> Mask | None:
    """The AND of ``parts`` (None: no term) and of the documents and padding when given; None when
    every pair is allowed."""
    parts = [*parts, None if document_ids is None else same_document(document_ids),
             None if padding is None else not_padding(padding)]
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else all_of(*parts)


def offset_mask_mod(mask_mod: MaskMod, q_start: int, kv_start: int) -> MaskMod:
    """``mask_mod`` seen from a tile whose first query / key sit at these global positions."""

    def fn(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + q_start, kv_idx + kv_start)

    return fn
