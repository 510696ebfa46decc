"""Per-batch sequence metadata shared by every rank and every layer."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

_generations = itertools.count(1)


def _check_2d(name: str, t: Tensor | None, allowed: tuple[torch.dtype, ...]) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"SequenceInfo.{name} must be a Tensor or None, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"SequenceInfo.{name} must be [B, S] (2-D), got shape {tuple(t.shape)}")
    if t.dtype not in allowed:
        raise TypeError(f"SequenceInfo.{name} must have dtype in {allowed}, got {t.dtype}")


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class SequenceInfo:
    """Whole-sequence (unsharded) metadata, identical on every rank.

    Each instance gets a fresh ``generation`` (an int64 scalar tensor) under which block masks
    are cached; build a new ``SequenceInfo`` for every batch and never mutate its tensors.

    Args:
        document_ids: [B, S] int, packed documents; attention stays within a document.
        block_ids: [B, S] int, image block of each vision token, -1 for text.
        padding: [B, S] bool, True where the key is padding.

    Raises:
        TypeError / ValueError: a tensor that is not [B, S] of the right dtype, or shapes that differ.
    """

    def __init__(self, document_ids: Tensor | None = None, block_ids: Tensor | None = None,
                 padding: Tensor | None = None) -> None:
        _check_2d("document_ids", document_ids, _INT_DTYPES)
        _check_2d("block_ids", block_ids, _INT_DTYPES)
        _check_2d("padding", padding, (torch.bool,))
        shapes = {tuple(t.shape) for t in (document_ids, block_ids, padding) if t is not None}
        if len(shapes) > 1:
            raise ValueError(f"SequenceInfo tensors must share one [B, S] shape, got {sorted(shapes)}")
        self.document_ids = document_ids
        self.block_ids = block_ids
        self.padding = padding
        self.generation = torch.tensor(next(_generations), dtype=torch.int64)

    @classmethod
    def from_hf(cls, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                mm_token_type_ids: Tensor | None = None) -> "SequenceInfo":
        """Derive the metadata as transformers' Gemma 4 does.

        Args:
            attention_mask: [B, S], 0 marks padding.
            position_ids: [B, S]; a position that does not follow its predecessor by 1 starts a
                new packed document.
            mm_token_type_ids: [B, S]; 1 and 2 are vision tokens, each run of them one block.
        """
        padding = None if attention_mask is None else attention_mask == 0
        document_ids = None if position_ids is None else documents_from_positions(position_ids)
        block_ids = None if mm_token_type_ids is None else blocks_from_token_types(mm_token_type_ids)
        return cls(document_ids=document_ids, block_ids=block_ids, padding=padding)

    def tensors(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.document_ids, self.block_ids, self.padding

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={None if t is None else tuple(t.shape)}"
            for name, t in zip(("document_ids", "block_ids", "padding"), self.tensors())
        )
        return f"SequenceInfo({fields}, generation={int(self.generation)})"


def documents_from_positions(position_ids: Tensor) -> Tensor | None:
    """[B, S] document index from position resets; None when every row is one document."""
    first = position_ids[:, :1] - 1
    starts = torch.diff(position_ids, prepend=first, dim=-1) != 1
    document_ids = starts.cumsum(-1)
    if (document_ids[:, -1] == 0).all():
        return None
    return document_ids


def blocks_from_token_types(mm_token_type_ids: Tensor) -> Tensor:
    """[B, S] image-block id of each vision token (types 1 and 2), -1 for text."""
    is_vision = (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
    prev_vision = torch.nn.functional.pad(is_vision[:, :-1], (1, 0), value=False)
    block = (is_vision & ~prev_vision).cumsum(-1) - 1
    return torch.where(is_vision, block, torch.full_like(block, -1))
