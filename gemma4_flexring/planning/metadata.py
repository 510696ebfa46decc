"""What a batch's metadata means for the masks: a content digest and which fields matter.

Computed once per ``SequenceInfo`` generation (see ``cache.py``). The digest keys the cached
plans and is what ranks compare before the first exchange, so it must tell apart any two
metadata contents, permutations included: it is a 128-bit BLAKE2b hash of the bytes.

Shape legend: B batch rows, S whole sequence length.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch
from torch import Tensor


class Metadata(NamedTuple):
    """A batch's metadata as the planner sees it.

    Attributes:
        digest: 16 bytes identifying the content (shape, and every field that matters).
        documents, blocks, padding: whether each field changes any mask (more than one document
            in some row; some vision token; some padding key).
    """

    digest: bytes
    documents: bool
    blocks: bool
    padding: bool

    def effective(self, document_ids: Tensor, block_ids: Tensor, padding: Tensor
                  ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The fields that matter, None for the others (fewer mask terms to evaluate)."""
        return (document_ids if self.documents else None, block_ids if self.blocks else None,
                padding if self.padding else None)

    @property
    def any(self) -> bool:
        return self.documents or self.blocks or self.padding



def content_digest(header: object, tensors: list[Tensor]) -> bytes:
    """128-bit BLAKE2b digest of ``repr(header)`` and the tensors' dtypes and bytes (read on the CPU)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((header, [str(t.dtype) for t in tensors])).encode())
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


def digest_words(digest: bytes) -> list[int]:
    """A 16-byte digest as two signed 64-bit integers (for an int64 all_gather)."""
    return [int.from_bytes(digest[i:i + 8], "little", signed=True) for i in (0, 8)]


def relevance(document_ids: Tensor | None, block_ids: Tensor | None, padding: Tensor | None
              ) -> tuple[bool, bool, bool]:
    """Whether each [B, S] field changes any mask: more than one document in some row, some
    vision token, some padding key (None: absent). Reads the data: eager code only."""
    return (document_ids is not None and bool((document_ids != document_ids[:, :1]).any()),
            block_ids is not None and bool((block_ids >= 0).any()),
            padding is not None and bool(padding.any()))


def informative(document_ids: Tensor | None, block_ids: Tensor | None, padding: Tensor | None
                ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The fields with None for each one that changes no mask."""
    fields = (document_ids, block_ids, padding)
    return tuple(t if used else None for t, used in zip(fields, relevance(*fields)))  # type: ignore[return-value]


def describe(document_ids: Tensor, block_ids: Tensor, padding: Tensor) -> Metadata:
    """Digest and relevance of [B, S] metadata (any device; read once on the CPU)."""
    document_ids, block_ids, padding = (t.detach().cpu() for t in (document_ids, block_ids, padding))
    matters = relevance(document_ids, block_ids, padding)
    used = [t for t, keep in zip((document_ids, block_ids, padding), matters) if keep]
    return Metadata(content_digest((tuple(padding.shape), matters), used), *matters)


def stamp(tensors: tuple[Tensor, ...]) -> tuple | None:
    """What identifies these tensors' current content without reading it: storage, layout and
    in-place version. None for inference tensors, which keep no version counter."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.stride(), str(t.device)) for t in tensors)


def document_starts(document_ids: Tensor) -> Tensor:
    """Per position, the first position of its document (a run of equal ids): int64 [B, S]."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    new = torch.ones_like(document_ids, dtype=torch.bool)
    new[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.where(new, index, torch.zeros_like(index)).cummax(1).values
