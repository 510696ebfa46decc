"""attention-gym's mask_mods, as its ``attn_gym/masks`` defines them: the definitions the presets
(``gemma4_flexring.presets``) are tested against. Copied, not imported (attention-gym is not on
the package index); from pytorch-labs/attention-gym (BSD 3-Clause License, Copyright (c) 2023, Driss
Guessous), trimmed to the mask functions.

Shape legend: N documents; S whole sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import and_masks, or_masks


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def generate_sliding_window(window_size: int):
    def sliding_window(b, h, q_idx, kv_idx):
        return q_idx - kv_idx <= window_size

    return and_masks(sliding_window, causal_mask)


def generate_prefix_lm_mask(prefix_length: int):
    def prefix_mask(b, h, q_idx, kv_idx):
        return kv_idx < prefix_length

    return or_masks(prefix_mask, causal_mask)


def generate_dilated_sliding_window(window_size: int, dilation: int):
    def dilated_sliding_window(b, h, q_idx, kv_idx):
        diff = torch.abs(q_idx - kv_idx)
        return (diff <= window_size) & ((diff % dilation) == 0)

    return dilated_sliding_window


def length_to_offsets(lengths: list[int], device) -> Tensor:
    """Cumulative document offsets [N + 1] of document lengths."""
    offsets = torch.tensor([0, *lengths], device=device, dtype=torch.int32)
    return torch.cumsum(offsets, dim=-1)


def offsets_to_doc_ids(offsets: Tensor) -> Tensor:
    """Document id of every position [S] (attention-gym's ``_offsets_to_doc_ids_tensor``)."""
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(len(counts), device=offsets.device, dtype=torch.int32), counts)


def generate_doc_mask_mod(mask_mod, offsets: Tensor):
    document_id = offsets_to_doc_ids(offsets)

    def doc_mask_mod(b, h, q_idx, kv_idx):
        same_doc = document_id[q_idx] == document_id[kv_idx]
        q_logical = q_idx - offsets[document_id[q_idx]]
        kv_logical = kv_idx - offsets[document_id[kv_idx]]
        return same_doc & mask_mod(b, h, q_logical, kv_logical)

    return doc_mask_mod
