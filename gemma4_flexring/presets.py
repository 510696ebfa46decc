"""Mask presets as ``FlexMask`` factories: tensors in, ``mask_mod(b, h, q_idx, kv_idx)`` out.

Each is attention-gym's (or, for ``chunked``, transformers' Llama 4) definition, over global
positions; use them as ``FlexMask(presets.prefix_lm, prefix=torch.tensor([37, 90]))``. Every
argument is a tensor, so a compiled model sees new values as new inputs, not as new constants.

Documents: every preset takes ``document_ids`` [B, S] (optional): positions then count from the
start of each document (a run of equal ids) and attention stays within it, as attention-gym's
``generate_doc_mask_mod`` does (a prefix, a chunk, a window per document). Without it, passing
``SequenceInfo(document_ids=...)`` to ``ring_attention`` only keeps attention within documents.

Block classes: each preset's mask_mod carries ``block_classes(q, k)``, its classes over blocks of
queries and keys (``planning/blocks.py``: empty, partial or full, int8 [B or 1, Qb, KVb]) from
their bounds and summaries, sound (tested against the mask evaluated entry by entry), so the
planner evaluates only partial blocks, as for a ``MaskSpec``. Where positions count from each
document's start (prefix-LM and chunks per document), only the documents are classed.

Shape legend: B batch rows, S whole sequence length, Qb / KVb query / key blocks; "[B] or []"
tensors are per row or shared.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .planning.blocks import and_classes, classes, equal_classes, or_classes, order_classes, window_classes
from .planning.flexmask import unknown_classes
from .planning.masks import MaskMod
from .planning.metadata import document_starts


def _classed(mask_mod: MaskMod, block_classes) -> MaskMod:
    """``mask_mod`` carrying its block classifier (see the module doc)."""
    mask_mod.block_classes = block_classes
    return mask_mod


def _per_row(t: Tensor, b: Tensor) -> Tensor:
    """``t`` ([B] or []) at batch row ``b``."""
    return t if t.dim() == 0 else t[b]


def causal(document_ids: Tensor | None = None) -> MaskMod:
    """Keys at or before the query: ``kv <= q``."""

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    return _within_documents(_classed(mask_mod, order_classes), document_ids)


def sliding_window(window: Tensor, document_ids: Tensor | None = None) -> MaskMod:
    """attention-gym's ``generate_sliding_window``: causal, ``q - kv <= window`` (``window`` []
    int: window + 1 keys, the query's own included)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)

    def block_classes(q, k):  # q - kv <= w is kv > q - (w + 1)
        return and_classes(order_classes(q, k), window_classes(q, k, window + 1, causal=True))

    return _within_documents(_classed(mask_mod, block_classes), document_ids)


def chunked(chunk: Tensor, document_ids: Tensor | None = None) -> MaskMod:
    """Llama 4's chunked attention (transformers' ``chunked_causal_mask_function``): causal within
    chunks of ``chunk`` ([] int) positions, ``q // chunk == kv // chunk``."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (torch.div(q_idx, chunk, rounding_mode="floor")
                                    == torch.div(kv_idx, chunk, rounding_mode="floor"))

    def block_classes(q, k):
        (q_first, q_last), (k_first, k_last) = (tuple(torch.div(t, chunk, rounding_mode="floor") for t in x.bounds())
                                                for x in (q, k))
        q_first, q_last, k_first, k_last = q_first[:, None], q_last[:, None], k_first[None, :], k_last[None, :]
        same = classes((q_first == q_last) & (k_first == k_last) & (q_first == k_first),
                       (q_last < k_first) | (k_last < q_first)).unsqueeze(0)
        return and_classes(order_classes(q, k), same)

    return _within_documents(_classed(mask_mod, block_classes), document_ids, shift_invariant=False)


def prefix_lm(prefix: Tensor, document_ids: Tensor | None = None) -> MaskMod:
    """attention-gym's ``generate_prefix_lm_mask``: causal, and every query sees the first
    ``prefix`` ([B] or [] int) keys both ways."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < _per_row(prefix, b))

    def block_classes(q, k):
        k_first, k_last = k.bounds()
        limit = prefix.reshape(-1, 1, 1)  # [B or 1, 1, 1]
        return or_classes(order_classes(q, k), classes(k_last[None, None, :] < limit, k_first[None, None, :] >= limit))

    return _within_documents(_classed(mask_mod, block_classes), document_ids, shift_invariant=False)


def global_tokens(is_global: Tensor, window: Tensor | None = None, document_ids: Tensor | None = None) -> MaskMod:
    """A few positions see and are seen by all (``is_global`` [B, S] bool, global positions; with
    ``document_ids``, all of their document); the others attend causally, within
    ``sliding_window(window)`` when ``window`` ([] int) is given."""
    local = causal(document_ids) if window is None else sliding_window(window, document_ids)
    starts = None if document_ids is None else document_starts(document_ids)

    def mask_mod(b, h, q_idx, kv_idx):
        hub = is_global[b, q_idx] | is_global[b, kv_idx]
        if starts is not None:
            hub = hub & (starts[b, q_idx] == starts[b, kv_idx])
        return local(b, h, q_idx, kv_idx) | hub

    def block_classes(q, k):
        (q_lo, q_hi), (k_lo, k_hi) = q.summary(is_global), k.summary(is_global)
        hub = or_classes(classes(q_lo == 1, q_hi == 0)[:, :, None], classes(k_lo == 1, k_hi == 0)[:, None, :])
        if starts is not None:
            hub = and_classes(hub, equal_classes(q, k, starts, starts))
        return or_classes(local.block_classes(q, k), hub)

    return _classed(mask_mod, block_classes)


def dilated_sliding_window(window: Tensor, dilation: Tensor, document_ids: Tensor | None = None) -> MaskMod:
    """attention-gym's ``generate_dilated_sliding_window``: both ways, ``|q - kv| <= window`` and
    ``|q - kv| % dilation == 0`` (``window``, ``dilation`` [] int)."""

    def mask_mod(b, h, q_idx, kv_idx):
        diff = (q_idx - kv_idx).abs()
        return (diff <= window) & (diff % dilation == 0)

    def block_classes(q, k):  # the dilation leaves a block full only when it is a single entry: partial
        return and_classes(window_classes(q, k, window, causal=False), unknown_classes(q, k))

    return _within_documents(_classed(mask_mod, block_classes), document_ids)


def _within_documents(mask_mod: MaskMod, document_ids: Tensor | None, shift_invariant: bool = True) -> MaskMod:
    """``mask_mod`` on positions within each document, and nothing across documents (attention-gym's
    ``generate_doc_mask_mod``); ``mask_mod`` itself without ``document_ids``. Its classes: the
    documents' AND ``mask_mod``'s when it depends on ``q - kv`` alone (``shift_invariant``: the
    same on positions counted from any start), else the documents' only."""
    if document_ids is None:
        return mask_mod
    starts = document_starts(document_ids)

    def doc_mask_mod(b, h, q_idx, kv_idx):
        q_start, kv_start = starts[b, q_idx], starts[b, kv_idx]
        return (q_start == kv_start) & mask_mod(b, h, q_idx - q_start, kv_idx - kv_start)

    def block_classes(q, k):
        inner = mask_mod.block_classes(q, k) if shift_invariant else unknown_classes(q, k)
        return and_classes(equal_classes(q, k, starts, starts), inner)

    return _classed(doc_mask_mod, block_classes)
