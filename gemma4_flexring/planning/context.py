"""One call's planning context: every decision the plans and exchange schedules share, made once.

Which metadata fields matter (a single document per row, no image or no padding change no mask
and are dropped), the batch the masks are built for (1 when no field matters), the whole mask over
global positions, where documents start, the layout, the sequence length and the block size.
The planner (``plan.py``) and the exchange read them from here; nothing downstream looks at the
raw metadata again.

Shape legend: B batch rows, S whole sequence length.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor

from ..layout import Layout
from .flexmask import FlexSpec
from .masks import Mask, MaskSpec, gemma4_mask, with_metadata
from .metadata import relevance

BLOCK_SIZE = 128  # tokens per block of the planner (and of the flex kernel's BlockMasks)


class PlanContext(NamedTuple):
    """What every plan and exchange schedule of one call derives from.

    Attributes:
        spec: the layer's mask: a ``MaskSpec``, or a ``FlexMask`` as a ``FlexSpec``.
        mask: the whole mask over global positions, with the metadata that matters; None when every
            pair is allowed.
        document_cuts: global positions where a document starts in some batch row (0 excluded).
        layout: how the sequence is split over the ranks.
        seq_len: S.
        batch: the masks' batch rows: B when some field matters or a FlexMask reads its row
            ``b``, else 1 (additive masks and flags are [batch or 1, ...]).
        block_size: tokens per block.
        device: where plans are built (the queries' device).
    """

    spec: MaskSpec | FlexSpec
    mask: Mask | None
    document_cuts: tuple[int, ...]
    layout: Layout
    seq_len: int
    batch: int
    block_size: int
    device: torch.device

    def key(self, *parts) -> tuple:
        """A cache key for something derived from this context and ``parts`` (the metadata's
        content is the cache's own key; the layout enters through ``layout_digest`` in ``parts``)."""
        return (self.spec, self.seq_len, self.batch, self.block_size, self.device, *parts)


def plan_context(spec: MaskSpec | FlexSpec, layout: Layout, seq_len: int, device: torch.device,
                 document_ids: Tensor | None = None, block_ids: Tensor | None = None,
                 padding: Tensor | None = None, relevant: tuple[bool, bool, bool] | None = None,
                 block_size: int | None = None) -> PlanContext:
    """The planning context of one call.

    Args:
        document_ids, block_ids, padding: whole-sequence metadata [B, S] (see ``SequenceInfo``),
            None when absent (a FlexMask that reads its row ``b`` takes B from them: give them all,
            as the op does).
        relevant: whether each field changes a mask, when already known (``Metadata``); None
            reads the data to find out.
        block_size: None for ``BLOCK_SIZE``, read at call time.
    """
    fields = (document_ids, block_ids, padding)
    relevant = relevance(*fields) if relevant is None else relevant
    documents, blocks, pads = (t if used else None for t, used in zip(fields, relevant))
    rows = 1
    if isinstance(spec, FlexSpec):  # image blocks are the mask_mod's business
        blocks, mask = None, with_metadata([spec.mask], documents, pads)
        rows = next((t.shape[0] for t in fields if t is not None), 1) if spec.per_row else 1
    else:
        # A window reaching past the sequence is no window: dropping it keeps the mask_mods'
        # arithmetic within the int32 indices a compiled flex kernel gives them.
        whole = spec.sliding_window is not None and spec.sliding_window >= seq_len
        mask = gemma4_mask(replace(spec, sliding_window=None) if whole else spec, documents, blocks, pads)
    batch = next((t.shape[0] for t in (documents, blocks, pads) if t is not None), rows)
    return PlanContext(spec, mask, document_cuts(documents), layout, seq_len, batch,
                       BLOCK_SIZE if block_size is None else block_size, device)


def document_cuts(document_ids: Tensor | None) -> tuple[int, ...]:
    """Global positions where a document starts in some batch row, position 0 excluded, sorted;
    none without documents. ``document_ids`` [B, S]."""
    if document_ids is None:
        return ()
    return tuple(((document_ids[:, 1:] != document_ids[:, :-1]).any(0).nonzero().flatten() + 1).tolist())
