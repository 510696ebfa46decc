"""Mask presets as ``FlexMask`` factories: tensors in, ``mask_mod(b, h, q_idx, kv_idx)`` out.

Each is attention-gym's (or, for ``chunked``, transformers' Llama 4) definition, over global
positions; use them as ``FlexMask(presets.prefix_lm, prefix=torch.tensor([37, 90]))``. Every
argument is a tensor, so a compiled model sees new values as new inputs, not as new constants.

Documents: every preset takes ``document_ids`` [B, S] (optional): positions then count from the
start of each document (a run of equal ids) and attention stays within it, as attention-gym's
``generate_doc_mask_mod`` does (a prefix, a chunk, a window per document). Without it, passing
``SequenceInfo(document_ids=...)`` to ``ring_attention`` only keeps attention within documents.

Shape legend: B batch rows, S whole sequence length; "[B] or []" tensors are per row or shared.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .planning.masks import MaskMod


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def _per_row(t: Tensor, b: Tensor) -> Tensor:
    """``t`` ([B] or []) at batch row ``b``."""
    return t if t.dim() == 0 else t[b]


def causal(document_ids: Tensor | None = None) -> MaskMod:
    """Keys at or before the query: ``kv <= q``."""
    return _within_documents(_causal, document_ids)


def sliding_window(window: Tensor, document_ids: Tensor | None = None) -> MaskMod:
    """attention-gym's ``generate_sliding_window``: causal, ``q - kv <= window`` (``window`` []
    int: window + 1 keys, the query's own included)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)

    return _within_documents(mask_mod, document_ids)


def chunked(chunk: Tensor, document_ids: Tensor | None = None) -> MaskMod:
    """Llama 4's chunked attention (transformers' ``chunked_causal_mask_function``): causal within
    chunks of ``chunk`` ([] int) positions, ``q // chunk == kv // chunk``."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (torch.div(q_idx, chunk, rounding_mode="floor")
                                    == torch.div(kv_idx, chunk, rounding_mode="floor"))

    return _within_documents(mask_mod, document_ids)


def prefix_lm(prefix: Tensor, document_ids: Tensor | None = None) -> MaskMod:
    """attention-gym's ``generate_prefix_lm_mask``: causal, and every query sees the first
    ``prefix`` ([B] or [] int) keys both ways."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < _per_row(prefix, b))

    return _within_documents(mask_mod, document_ids)


def global_tokens(is_global: Tensor, window: Tensor | None = None, document_ids: Tensor | None = None) -> MaskMod:
    """A few positions see and are seen by all (``is_global`` [B, S] bool, global positions; with
    ``document_ids``, all of their document); the others attend causally, within
    ``sliding_window(window)`` when ``window`` ([] int) is given."""
    local = _within_documents(_causal if window is None else sliding_window(window), document_ids)
    starts = None if document_ids is None else document_starts(document_ids)

    def mask_mod(b, h, q_idx, kv_idx):
        hub = is_global[b, q_idx] | is_global[b, kv_idx]
        if starts is not None:
            hub = hub & (starts[b, q_idx] == starts[b, kv_idx])
        return local(b, h, q_idx, kv_idx) | hub

    return mask_mod


def dilated_sliding_window(window: Tensor, dilation: Tensor, document_ids: Tensor | None = None) -> MaskMod:
    """attention-gym's ``generate_dilated_sliding_window``: both ways, ``|q - kv| <= window`` and
    ``|q - kv| % dilation == 0`` (``window``, ``dilation`` [] int)."""

    def mask_mod(b, h, q_idx, kv_idx):
        diff = (q_idx - kv_idx).abs()
        return (diff <= window) & (diff % dilation == 0)

    return _within_documents(mask_mod, document_ids)


def document_starts(document_ids: Tensor) -> Tensor:
    """Per position, the first position of its document (a run of equal ids): int64 [B, S]."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    new = torch.ones_like(document_ids, dtype=torch.bool)
    new[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.where(new, index, torch.zeros_like(index)).cummax(1).values


def _within_documents(mask_mod: MaskMod, document_ids: Tensor | None) -> MaskMod:
    """``mask_mod`` on positions within each document, and nothing across documents (attention-gym's
    ``generate_doc_mask_mod``); ``mask_mod`` itself without ``document_ids``."""
    if document_ids is None:
        return mask_mod
    starts = document_starts(document_ids)

    def doc_mask_mod(b, h, q_idx, kv_idx):
        q_start, kv_start = starts[b, q_idx], starts[b, kv_idx]
        return (q_start == kv_start) & mask_mod(b, h, q_idx - q_start, kv_idx - kv_start)

    return doc_mask_mod
