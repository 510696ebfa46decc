"""Per-batch sequence metadata shared by every rank and every layer."""

from __future__ import annotations

import os
import threading

import torch
import torch.utils._pytree as pytree
from torch import Tensor


def _random_start() -> int:
    # Each process counts from its own random point (below 2**56, leaving room to count): a
    # SequenceInfo built in another process (a DataLoader worker, forked or spawned) and sent here
    # must not carry a generation this process also hands out, or it could hit stale plans.
    return int.from_bytes(os.urandom(7), "little") + 1


# The last generation handed out. A tensor, not a Python counter: when a ``SequenceInfo`` is built
# inside a compiled function, dynamo would burn a Python int into the graph and guard on the
# counter (one recompile per batch); an in-place add on a module tensor is traced as a runtime
# mutation instead, so every call of the compiled code still gets a fresh generation.
_LAST_GENERATION = torch.tensor(_random_start(), dtype=torch.int64)
_LOCK = threading.Lock()
os.register_at_fork(after_in_child=lambda: _LAST_GENERATION.fill_(_random_start()))


def next_generation() -> Tensor:
    """A fresh int64 scalar tensor: larger than every generation this process handed out before,
    and with overwhelming probability one no other process hands out. Never 0 (the generation
    of calls without metadata)."""
    if torch.compiler.is_compiling():
        return _LAST_GENERATION.add_(1).clone()
    with _LOCK:
        return _LAST_GENERATION.add_(1).clone()


def _check_2d(name: str, t: Tensor | None, allowed: tuple[torch.dtype, ...]) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"SequenceInfo.{name} must be a Tensor or None, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"SequenceInfo.{name} must be [B, S] (2-D), got shape {tuple(t.shape)}")
    if t.dtype not in allowed:
        raise TypeError(f"SequenceInfo.{name} must have dtype in {allowed}, got {t.dtype}")


_SIGNED_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8)
_INT_DTYPES = (*_SIGNED_DTYPES, torch.uint8)


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
        _check_2d("block_ids", block_ids, _SIGNED_DTYPES)  # signed: text is -1
        _check_2d("padding", padding, (torch.bool,))
        # Compared pairwise, not hashed in a set: hashing a symbolic size under torch.compile
        # would specialize the sequence length.
        present = [t for t in (document_ids, block_ids, padding) if t is not None]
        if any(t.shape != present[0].shape for t in present[1:]):
            shapes = sorted({tuple(t.shape) for t in present})
            raise ValueError(f"SequenceInfo tensors must share one [B, S] shape, got {shapes}")
        self.document_ids = document_ids
        self.block_ids = block_ids
        self.padding = padding
        self.generation = next_generation()

    @classmethod
    def from_hf(cls, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                mm_token_type_ids: Tensor | None = None) -> "SequenceInfo":
        """Derive the metadata as transformers' Gemma 4 does.

        Args:
            attention_mask: [B, S], 0 marks padding.
            position_ids: [B, S] or [1, S] (shared by every row); a position that does not follow
                its predecessor by 1 starts a new packed document.
            mm_token_type_ids: [B, S]; 1 and 2 are vision tokens, each run of them one block.
        """
        padding = None if attention_mask is None else _unless_trivial(attention_mask == 0, lambda p: p.any())
        if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[0] == 1:
            rows = [t.shape[0] for t in (attention_mask, mm_token_type_ids) if t is not None and t.dim() == 2]
            position_ids = position_ids.expand(rows[0] if rows else 1, -1)
        document_ids = None if position_ids is None else documents_from_positions(position_ids)
        block_ids = None
        if mm_token_type_ids is not None:
            block_ids = _unless_trivial(blocks_from_token_types(mm_token_type_ids), lambda b: (b >= 0).any())
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
    return _unless_trivial(starts.cumsum(-1), lambda d: (d[:, -1] != 0).any())


def _unless_trivial(t: Tensor, matters) -> Tensor | None:
    """``t``, or None where ``matters(t)`` says it changes no mask (a smaller plan batch, fewer
    mask terms). Not under torch.compile: the check reads data and would break the graph, and
    keeping the trivial tensor gives the same mask."""
    if torch.compiler.is_compiling() or bool(matters(t)):
        return t
    return None


def blocks_from_token_types(mm_token_type_ids: Tensor) -> Tensor:
    """[B, S] image-block id of each vision token (types 1 and 2), -1 for text."""
    is_vision = (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
    prev_vision = torch.nn.functional.pad(is_vision[:, :-1], (1, 0), value=False)
    block = (is_vision & ~prev_vision).cumsum(-1) - 1
    return torch.where(is_vision, block, torch.full_like(block, -1))


# A pytree node, so that ``torch.export`` takes a ``SequenceInfo`` as a model input (its tensors,
# generation included, become graph inputs) and ``torch.export.save`` / ``load`` round-trip it.
_FIELDS = ("document_ids", "block_ids", "padding", "generation")


def _flatten(info: SequenceInfo):
    return [getattr(info, f) for f in _FIELDS], None


def _flatten_with_keys(info: SequenceInfo):
    return [(pytree.GetAttrKey(f), getattr(info, f)) for f in _FIELDS], None


def _unflatten(values, context) -> SequenceInfo:
    info = SequenceInfo.__new__(SequenceInfo)  # no __init__: keep the given generation
    for f, value in zip(_FIELDS, values):
        setattr(info, f, value)
    return info


pytree.register_pytree_node(SequenceInfo, _flatten, _unflatten, serialized_type_name="gemma4_flexring.SequenceInfo",
                            flatten_with_keys_fn=_flatten_with_keys)
# ``torch.export.save`` stores example inputs, SequenceInfo among them; let ``torch.export.load``
# (weights_only unpickling) rebuild it without falling back to a full unpickle.
torch.serialization.add_safe_globals([SequenceInfo])
