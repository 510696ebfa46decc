"""Whole-sequence batches into one rank's model kwargs: ``shard_inputs``, ``shift_labels`` and
``shard_token_features``.

Every rank of a CP group passes the same whole-sequence batch; each gets its tokens in layout
order, the ``RingContext`` for the attention calls, and targets shifted on the whole sequence
(the next token may live on another rank). The ranks agree on the batch (shape, content, layout)
in one small all_gather before any exchange.

Shape legend: B batch, S whole sequence, P ranks, L = S / P local tokens, N marked tokens, H features.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..ahead import plan_ahead as start_planning
from ..comm import process_group
from ..info import SequenceInfo
from ..layout import LAYOUTS, Layout
from ..planning.metadata import content_digest, digest_words
from ..validate import Problem, agree
from .attention import (ATTN_IMPLEMENTATION, CONTEXT_KWARG, RingContext, chunk_size, ring_layer_mix, ring_masks,
                        text_attention_layers, uses_ring_attention)

IGNORE_INDEX = -100


def shift_labels(labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Next-token targets on the whole sequence: position i is trained to predict token i + 1.

    transformers shifts inside its loss; under CP the next token may live on another rank, so
    the shift happens here, before sharding. Positions whose own token or next token is padding
    (``attention_mask == 0``) are ignored too: with right padding, and ``labels`` at -100 on
    padding as usual, this is exactly transformers' loss; with left padding transformers would
    also train the last padding position to predict the first token.

    Shapes: labels [B, S] (``IGNORE_INDEX`` = ignored) -> [B, S], the last position ignored.
    """
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    if attention_mask is not None:
        real = attention_mask != 0
        target_real = torch.nn.functional.pad(real[:, 1:], (0, 1), value=False)
        shifted = shifted.masked_fill(~(real & target_real), IGNORE_INDEX)
    return shifted


_SHARD_FIELDS = ("failed", "batch", "seq_len", "balanced", "layout kind", "world_size",
                 *("batch content (input_ids, position_ids, attention_mask, mm_token_type_ids, labels)",) * 2)


def shard_inputs(model: torch.nn.Module, *, input_ids: Tensor, position_ids: Tensor | None = None,
                 attention_mask: Tensor | None = None, mm_token_type_ids: Tensor | None = None,
                 labels: Tensor | None = None, layout: Layout | str, rank: int, group=None,
                 plan_ahead: bool = False) -> dict:
    """Keyword arguments of one rank's ``model(**kwargs)`` for a whole-sequence batch.

    Every argument is the whole sequence, identical on every rank. Every rank of the group must
    call this for each batch: the ranks agree on the batch's shape, on a digest of its content
    and on every check below (one small all_gather), so that a mistake on one rank, or ranks
    handed different batches, raises on all of them.

    Args:
        layout: a ``Layout``, or ``"balanced"`` for ``Layout.balanced`` of this batch over the
            group, weighing the model's mix of ring layers (``ring_layer_mix``: Gemma 4's sliding
            and global layers by their counts), built from its packing; every rank computes the
            same one. The returned
            context carries the layout: ``kwargs[CONTEXT_KWARG].layout.unshard(...)`` reassembles
            per-rank logits.

    Shapes:
        input_ids: [B, S]. position_ids: [B, S] or [1, S], default 0 .. S - 1; restarts mark
        packed documents. attention_mask: [B, S], 0 = padding. mm_token_type_ids: [B, S], 1 and 2
        mark image tokens (``Gemma4ForConditionalGeneration``). labels: [B, S], unshifted, as for
        one process (-100 = ignored).

    Args:
        model: the model these inputs are for; its text attention must go through the ring
            (``use_ring_attention``): any other attention would ignore the ring context and attend
            within this rank's shard only.
        plan_ahead: start building the batch's plans and exchange schedules on a background
            thread (``gemma4_flexring.plan_ahead``, for each distinct mask of the model's layers, in
            its parameters' dtype). Call ``shard_inputs`` for the next batch before running the
            current one, and its planning overlaps the current step; its ``model(**kwargs)`` then
            finds the plans ready (or plans what is missing itself, exactly).

    Returns:
        A dict for ``model(**kwargs)``: ``input_ids``, ``position_ids`` (global positions) and, if
        given, ``mm_token_type_ids``, each [B, L], this rank's tokens in layout order;
        ``use_cache=False``; ``CONTEXT_KWARG``: the ``RingContext``. With labels: ``labels`` and
        ``shift_labels`` [B, L], shifted on the whole sequence then sharded (see ``shift_labels``),
        and ``num_items_in_batch``, the global count of targets (0-dim int64). transformers' loss
        then is this rank's *summed* cross entropy divided by the global count: the per-rank
        losses add up to the one-process mean loss (do not average them).

    Raises:
        ValueError (TypeError for a wrong type in a world of one), on every rank: a model that does
            not use the ring, bad shapes, a length the layout cannot split, a rank outside the
            layout or not this process's rank in the group, a layout whose world size is not the
            group's, a left-padded batch for a model with chunked attention (Llama 4), or ranks
            that disagree on the batch's shape, content or layout.
    """
    group = process_group(group)
    balanced = isinstance(layout, str) and layout == "balanced"
    # A balanced layout is built from the batch after the checks; a contiguous one stands in for them.
    placement = Layout("contiguous", 1 if group is None else group.size()) if balanced else layout
    problems = _batch_problems(input_ids, position_ids, attention_mask, mm_token_type_ids, labels)
    problems += _placement_problems(placement, rank, group, input_ids.shape[1] if not problems else None)
    if (attention_mask is not None and not problems and bool((attention_mask[:, 0] == 0).any())
            and any(chunk_size(m) is not None for m in text_attention_layers(model))):
        problems.append((ValueError, "the batch is left-padded and the model has chunked attention (Llama 4), whose "
                                     "chunks transformers counts from each row's first real token: pad on the right"))
    if not uses_ring_attention(model):
        problems.append((ValueError, f"the model's attention is not {ATTN_IMPLEMENTATION!r}, so it would ignore "
                                     "the ring context; call gemma4_flexring.hf.use_ring_attention(model) first"))
    agree(problems, group, lambda: [0, *input_ids.shape, int(balanced), LAYOUTS.index(placement.kind),
                                    placement.world_size, *digest_words(_batch_digest(
                                        input_ids, position_ids, attention_mask, mm_token_type_ids, labels))],
          _SHARD_FIELDS, "shard_inputs")
    batch, seq_len = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
    position_ids = position_ids.expand(batch, seq_len)
    info = SequenceInfo.from_hf(attention_mask, position_ids, mm_token_type_ids)
    if balanced:
        layout = Layout.balanced(info, placement.world_size, masks=ring_layer_mix(model, info))

    def local(t: Tensor) -> Tensor:
        return layout.shard(t, 1, rank).contiguous()

    if plan_ahead:
        dtype = next(model.parameters()).dtype
        start_planning(info, ring_masks(model, info), layout=layout, group=group, dtype=dtype, device=input_ids.device)
    kwargs = {"input_ids": local(input_ids), "position_ids": local(position_ids), "use_cache": False,
              CONTEXT_KWARG: RingContext(info, layout, group)}
    if mm_token_type_ids is not None:
        kwargs["mm_token_type_ids"] = local(mm_token_type_ids)
    if labels is not None:
        targets = shift_labels(labels, attention_mask)
        kwargs["labels"] = kwargs["shift_labels"] = local(targets)
        kwargs["num_items_in_batch"] = (targets != IGNORE_INDEX).sum()
    return kwargs


def _batch_digest(*tensors: Tensor | None) -> bytes:
    """128-bit digest of a batch's content: which of ``shard_inputs``' tensors are given, their
    shapes and values. Ranks compare it, so a rank handed other tokens with the same packing
    cannot pass unnoticed."""
    given = [t for t in tensors if t is not None]
    return content_digest(tuple(None if t is None else tuple(t.shape) for t in tensors), given)


def shard_token_features(features: Tensor, token_mask: Tensor, layout: Layout, rank: int) -> Tensor:
    """This rank's rows of per-token features, such as image soft tokens.

    transformers writes ``features`` into the positions where ``token_mask`` is True, in
    row-major order (``masked_scatter``); a rank must hand its model only the rows of its own
    tokens, in its local order. The vision tower runs whole on every rank; the gradient of each
    feature row reaches it from the one rank that holds the token, so summing gradients over
    ranks stays exact.

    Shapes:
        features: [N, H], N = token_mask.sum(); token_mask: [B, S] bool, the whole sequence.
        returns: [N_local, H], differentiable w.r.t. ``features``.

    ``layout`` is the one the inputs were sharded with (``kwargs[CONTEXT_KWARG].layout`` after
    ``shard_inputs(..., layout="balanced")``).

    Example (``Gemma4ForConditionalGeneration``)::

        image_mask = input_ids == model.config.image_token_id
        image = model.get_image_features(pixel_values, image_position_ids)
        local = hf.shard_token_features(torch.cat(image.pooler_output), image_mask, layout, rank)
        image.pooler_output = (local,)
        model(**kwargs, mm_encoder_outputs={"image": image})

    Raises:
        ValueError: ``features`` does not have one row per True of ``token_mask``.
    """
    count = int(token_mask.sum())
    if features.dim() != 2 or features.shape[0] != count:
        raise ValueError(f"shard_token_features: features must be [N={count}, H] (one row per marked token), "
                         f"got {tuple(features.shape)}")
    row = torch.full(token_mask.shape, -1, dtype=torch.long, device=token_mask.device)
    row[token_mask] = torch.arange(count, device=token_mask.device)
    local = layout.shard(row, 1, rank)
    return features[local[local >= 0].to(features.device)]


def _batch_problems(input_ids: Tensor, position_ids: Tensor | None, attention_mask: Tensor | None,
                    mm_token_type_ids: Tensor | None, labels: Tensor | None) -> list[Problem]:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        return [(ValueError, f"input_ids must be a [B, S] tensor, got {shape}")]
    problems: list[Problem] = []
    shape = tuple(input_ids.shape)
    named = {"position_ids": position_ids, "attention_mask": attention_mask,
             "mm_token_type_ids": mm_token_type_ids, "labels": labels}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            problems.append((TypeError, f"{name} must be a Tensor or None, got {type(t).__name__}"))
            continue
        allowed = {shape, (1, shape[1])} if name == "position_ids" else {shape}
        if tuple(t.shape) not in allowed:
            problems.append((ValueError, f"{name} must have input_ids' shape {shape}, got {tuple(t.shape)}"))
    return problems


def _placement_problems(layout: Layout, rank: int, group: dist.ProcessGroup | None,
                        seq_len: int | None) -> list[Problem]:
    """What is wrong with where this rank's shard would come from (``seq_len`` None: unknown)."""
    if not isinstance(layout, Layout):
        return [(TypeError, f"layout must be a Layout or 'balanced', got {type(layout).__name__}")]
    problems: list[Problem] = []
    if seq_len is not None:
        try:
            layout.check_length(seq_len)
        except ValueError as e:
            problems.append((ValueError, str(e)))
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < layout.world_size:
        problems.append((ValueError, f"rank must be an int in [0, {layout.world_size}), got {rank!r}"))
    group_size = 1 if group is None else group.size()
    if group_size != layout.world_size:
        problems.append((ValueError, f"layout is for {layout.world_size} ranks, the group has {group_size}"))
    elif group is not None and rank != group.rank():
        problems.append((ValueError, f"rank {rank} is not this process's rank {group.rank()} in the CP group"))
    return problems
