"""Per-batch sequence metadata shared by every rank and every layer.

Shape legend: B batch rows, S whole (unsharded) sequence length.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch import Tensor

def _new_generation(like: Tensor) -> Tensor:
    """A fresh generation from the custom op (registered by ``ops.py``, which the package imports;
    called by name so that this data type sits below the engine in the import graph)."""
    return torch.ops.gemma4_flexring.new_generation.default(like)


_FIELDS = ("document_ids", "block_ids", "padding", "generation")
_SIGNED_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8)
_INT_DTYPES = (*_SIGNED_DTYPES, torch.uint8)


def _check_2d(name: str, t: Tensor | None, allowed: tuple[torch.dtype, ...]) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"SequenceInfo.{name} must be a Tensor or None, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"SequenceInfo.{name} must be [B, S] (2-D), got shape {tuple(t.shape)}")
    if t.dtype not in allowed:
        raise TypeError(f"SequenceInfo.{name} must have dtype in {allowed}, got {t.dtype}")


class SequenceInfo:
    """Whole-sequence (unsharded) metadata, identical on every rank; immutable.

    Every field is always a tensor, whatever the batch holds, so that a compiled or exported
    model sees one structure for every batch: a field that is not given gets its "absent" value
    (one document per row, no image, no padding), which gives the same mask. Whether a field
    matters is decided inside the op, once per batch.

    Each instance gets a fresh ``generation`` (an int64 scalar tensor, made by the custom op
    ``gemma4_flexring::new_generation``, so compiled and exported code makes a new one at run
    time too) under which the op looks up its block-mask plans. Build a new ``SequenceInfo``
    for every batch; never mutate its tensors in place (a mutation is detected and replanned,
    at the cost of hashing the metadata again).

    Args:
        document_ids: [B, S] int, packed documents; attention stays within a document.
            Absent: zeros (one document per row).
        block_ids: [B, S] signed int, image block of each vision token, -1 for text.
            Absent: -1 everywhere.
        padding: [B, S] bool, True where the key is padding. Absent: False everywhere.
        shape: (B, S), needed only when no tensor is given.
        device: where to put absent fields when no tensor is given (default CPU).

    Attributes:
        document_ids, block_ids: [B, S] int64. padding: [B, S] bool. generation: int64 [].

    Raises:
        TypeError / ValueError: a tensor that is not [B, S] of the right dtype, shapes that
            differ, or neither a tensor nor ``shape``.
    """

    __slots__ = _FIELDS

    def __init__(self, document_ids: Tensor | None = None, block_ids: Tensor | None = None,
                 padding: Tensor | None = None, *, shape: tuple[int, int] | None = None,
                 device: torch.device | str | None = None) -> None:
        _check_2d("document_ids", document_ids, _INT_DTYPES)
        _check_2d("block_ids", block_ids, _SIGNED_DTYPES)  # signed: text is -1
        _check_2d("padding", padding, (torch.bool,))
        present = [t for t in (document_ids, block_ids, padding) if t is not None]
        # Compared pairwise, not hashed in a set: hashing a symbolic size under torch.compile
        # would specialize the sequence length.
        if any(t.shape != present[0].shape for t in present[1:]):
            shapes = sorted({tuple(t.shape) for t in present})
            raise ValueError(f"SequenceInfo tensors must share one [B, S] shape, got {shapes}")
        if present:
            shape, device = present[0].shape, present[0].device
        elif shape is None:
            raise ValueError("SequenceInfo needs at least one tensor, or shape=(B, S) for a batch without metadata")
        elif len(shape) != 2:
            raise ValueError(f"SequenceInfo shape must be (B, S), got {tuple(shape)}")
        as_int = dict(dtype=torch.int64, device=device)
        fields = (
            torch.zeros(shape, **as_int) if document_ids is None else document_ids.to(torch.int64),
            torch.full(shape, -1, **as_int) if block_ids is None else block_ids.to(torch.int64),
            torch.zeros(shape, dtype=torch.bool, device=device) if padding is None else padding,
        )
        _set_fields(self, (*fields, _new_generation(fields[0])))

    @classmethod
    def from_hf(cls, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                mm_token_type_ids: Tensor | None = None) -> "SequenceInfo":
        """Derive the metadata as transformers' Gemma 4 does.

        Args:
            attention_mask: [B, S], 0 marks padding.
            position_ids: [B, S] or [1, S] (shared by every row); a position that does not follow
                its predecessor by 1 starts a new packed document.
            mm_token_type_ids: [B, S]; 1 and 2 are vision tokens, each run of them one block.

        Raises:
            ValueError: a tensor that is not 2-D, or none given.
        """
        named = {"attention_mask": attention_mask, "position_ids": position_ids,
                 "mm_token_type_ids": mm_token_type_ids}
        for name, t in named.items():
            if t is not None and (not isinstance(t, Tensor) or t.dim() != 2):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"SequenceInfo.from_hf: {name} must be a [B, S] tensor, got {shape}")
        if all(t is None for t in named.values()):
            raise ValueError("SequenceInfo.from_hf needs attention_mask, position_ids or mm_token_type_ids")
        padding = None if attention_mask is None else attention_mask == 0
        if position_ids is not None and position_ids.shape[0] == 1:
            rows = [t.shape[0] for t in (attention_mask, mm_token_type_ids) if t is not None]
            position_ids = position_ids.expand(rows[0] if rows else 1, -1)
        document_ids = None if position_ids is None else documents_from_positions(position_ids)
        block_ids = None if mm_token_type_ids is None else blocks_from_token_types(mm_token_type_ids)
        return cls(document_ids=document_ids, block_ids=block_ids, padding=padding)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(document_ids, block_ids, padding), each [B, S]."""
        return self.document_ids, self.block_ids, self.padding

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"SequenceInfo is immutable (cannot set {name!r}): build a new SequenceInfo "
                             "for new metadata, so that it gets a new generation")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"SequenceInfo is immutable (cannot delete {name!r})")

    def __copy__(self) -> "SequenceInfo":
        return self  # immutable: a copy would be indistinguishable

    def __deepcopy__(self, memo) -> "SequenceInfo":
        import copy

        return SequenceInfo(*(copy.deepcopy(t, memo) for t in self.tensors()))

    def __getstate__(self) -> tuple:
        return tuple(getattr(self, f) for f in _FIELDS)

    def __setstate__(self, state: tuple) -> None:
        _set_fields(self, state)  # unpickled in another process: keep the sender's generation

    def __repr__(self) -> str:
        batch, seq_len = self.padding.shape
        return f"SequenceInfo(B={batch}, S={seq_len}, generation={int(self.generation)})"


def _set_fields(info: SequenceInfo, values) -> None:
    for name, value in zip(_FIELDS, values):
        object.__setattr__(info, name, value)


def documents_from_positions(position_ids: Tensor) -> Tensor:
    """[B, S] document index from position resets (zeros when every row is one document)."""
    first = position_ids[:, :1] - 1
    starts = torch.diff(position_ids, prepend=first, dim=-1) != 1
    return starts.cumsum(-1)


def blocks_from_token_types(mm_token_type_ids: Tensor) -> Tensor:
    """[B, S] image-block id of each vision token (types 1 and 2), -1 for text."""
    is_vision = (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
    prev_vision = torch.nn.functional.pad(is_vision[:, :-1], (1, 0), value=False)
    block = (is_vision & ~prev_vision).cumsum(-1) - 1
    return torch.where(is_vision, block, torch.full_like(block, -1))


# A pytree node, so that ``torch.export`` takes a ``SequenceInfo`` as a model input and
# ``torch.export.save`` / ``load`` round-trip it. Unflattening tensors makes a new generation:
# the leaves may be new tensors (``tree_map``), and in an exported program the generation is
# then made by the op at run time, never a traced constant.
def _flatten(info: SequenceInfo):
    return [getattr(info, f) for f in _FIELDS], None


def _flatten_with_keys(info: SequenceInfo):
    return [(pytree.GetAttrKey(f), getattr(info, f)) for f in _FIELDS], None


def _unflatten(values, context) -> SequenceInfo:
    values = list(values)
    if all(isinstance(v, Tensor) for v in values):
        values[-1] = _new_generation(values[0])
    info = SequenceInfo.__new__(SequenceInfo)
    _set_fields(info, values)  # leaves need not be tensors (pytrees of shapes, specs, ...)
    return info


pytree.register_pytree_node(SequenceInfo, _flatten, _unflatten, serialized_type_name="gemma4_flexring.SequenceInfo",
                            flatten_with_keys_fn=_flatten_with_keys)
# ``torch.export.save`` stores example inputs, SequenceInfo among them; let ``torch.export.load``
# (weights_only unpickling) rebuild it without falling back to a full unpickle.
torch.serialization.add_safe_globals([SequenceInfo])
