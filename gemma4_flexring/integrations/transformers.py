"""transformers integration: ``attn_implementation="gemma4_flexring"`` for Gemma 4 under context parallelism.

Every rank of the CP group runs the same model on its shard of the same whole-sequence batch::

    from gemma4_flexring import Layout, hf

    model = hf.use_ring_attention(Gemma4ForCausalLM(config))   # or Gemma4ForConditionalGeneration
    kwargs = hf.shard_inputs(model, input_ids=ids, position_ids=pos, attention_mask=am, labels=labels,
                             layout=Layout("zigzag", world_size), rank=rank, group=group)
    out = model(**kwargs)      # out.logits [B, L, V]: this rank's tokens, in layout order
    out.loss.backward()        # out.loss is this rank's share: the sum over ranks is the one-process loss
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)                # SUM: the shares add up

With data parallelism and FSDP2 (``cp_mesh``, ``fully_shard_model``, ``scale_loss_to_global_batch``,
from ``integrations/fsdp.py``), FSDP2 reduces the gradients itself: no all_reduce of your own.

How it fits transformers:

- ``register()`` adds the attention function and a mask hook under ``ATTN_IMPLEMENTATION``; the
  hook returns None, so transformers builds no [B, 1, S, S] mask at all.
- ``shard_inputs`` puts a ``RingContext`` (whole-sequence ``SequenceInfo``, layout, group) in the
  model's kwargs under ``CONTEXT_KWARG``; transformers hands it down to every attention call.
- The attention function reads each layer's mask from the module: ``sliding_window``,
  ``is_causal`` and ``config.use_bidirectional_attention`` (see ``mask_spec``).
- Labels are shifted on the whole sequence before sharding (``shift_labels``), and the loss is
  normalized by the global number of targets (transformers' ``num_items_in_batch``), so per-rank
  losses add up instead of averaging.
- Image soft tokens: give each rank its rows with ``shard_token_features``.

Shape legend: B batch, S whole sequence, P ranks, L = S / P local tokens, H heads, D head dim,
V vocabulary.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor

from ..api import ring_attention
from ..comm import process_group, resolve_group
from ..info import SequenceInfo
from ..layout import LAYOUTS, Layout
from ..planning.masks import MaskSpec
from ..planning.metadata import content_digest, digest_words
from ..validate import Problem, agree
from .fsdp import CPMesh, cp_mesh, fully_shard_model, scale_loss_to_global_batch  # noqa: F401 - hf's names

ATTN_IMPLEMENTATION = "gemma4_flexring"
CONTEXT_KWARG = "ring_context"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class RingContext:
    """What the attention function needs besides q, k, v; the same object for every layer.

    Args:
        info: whole-sequence metadata (documents, image blocks, padding), identical on every rank.
        layout: how the sequence is sharded over the group.
        group: the context-parallel ProcessGroup; None for a world of one (no torch.distributed).
    """

    info: SequenceInfo
    layout: Layout
    group: dist.ProcessGroup | None = None


def _context_flatten(context: RingContext):
    return _context_children(context), _context_meta(context)


def _context_flatten_with_keys(context: RingContext):
    keys = [pytree.GetAttrKey("info"), pytree.GetAttrKey("layout_permutation")]
    return list(zip(keys, _context_children(context))), _context_meta(context)


def _context_children(context: RingContext) -> list:
    """The SequenceInfo, then a table layout's permutation (a tensor that changes every batch)."""
    permutation = context.layout.permutation
    return [context.info] if permutation is None else [context.info, permutation]


def _context_meta(context: RingContext) -> tuple[str, int, str]:
    group = "" if context.group is None else context.group.group_name
    return (context.layout.kind, context.layout.world_size, group)


def _context_unflatten(values, meta: tuple[str, int, str]) -> RingContext:
    kind, world_size, group = meta
    pg = resolve_group(group)
    layout = Layout(kind, world_size, *values[1:])
    return RingContext(values[0], layout, pg)


# A pytree node (children: the SequenceInfo and, for a balanced layout, its permutation tensor; the
# layout's kind and world size and the group by name in its context), so that ``torch.export``
# takes a model's ``ring_context`` kwarg and ``torch.export.save`` stores it, and a compiled model
# sees a new balanced layout as new tensor values, not new constants.
pytree.register_pytree_node(
    RingContext, _context_flatten, _context_unflatten, serialized_type_name="gemma4_flexring.hf.RingContext",
    flatten_with_keys_fn=_context_flatten_with_keys,
    to_dumpable_context=lambda meta: json.dumps(meta), from_dumpable_context=lambda text: tuple(json.loads(text)))
# ``torch.export.save`` pickles the example inputs; ``load`` unpickles them with weights_only.
torch.serialization.add_safe_globals([RingContext, Layout])


def mask_spec(module: torch.nn.Module) -> MaskSpec:
    """The MaskSpec of one Gemma 4 text attention layer, read from the module.

    Sliding layers (``module.sliding_window`` set) get block-bidirectional image blocks when
    ``config.use_bidirectional_attention == "vision"``; global layers stay causal, as in
    transformers' ``create_masks_for_vision_model``. With ``"all"``, ``module.is_causal`` is False.
    """
    window = module.sliding_window
    vision = getattr(module.config, "use_bidirectional_attention", None) == "vision"
    return MaskSpec(causal=bool(module.is_causal), sliding_window=window,
                    block_bidirectional=vision and window is not None)


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      ring_context: RingContext | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers attention function (the ``AttentionInterface`` signature).

    Shapes:
        query: [B, Hq, L, D]; key, value: [B, Hkv, L, D], this rank's tokens in layout order.
        returns: ([B, L, Hq, D], None), as ``sdpa_attention_forward``.

    Args:
        attention_mask: ignored (the mask hook makes it None); masks come from ``ring_context``.
        dropout: must be 0 (attention dropout is not supported).
        scaling: score scale (Gemma 4 passes 1.0).
        ring_context: the CP context from ``shard_inputs``, passed down through the model's kwargs.

    Raises:
        ValueError: dropout > 0 or no ``ring_context``, before any exchange.
    """
    if dropout:
        raise ValueError(f"{ATTN_IMPLEMENTATION}: attention dropout is not supported, got dropout={dropout}; "
                         "set config.attention_dropout = 0.0 or call model.eval()")
    if ring_context is None:
        raise ValueError(f"{ATTN_IMPLEMENTATION}: no {CONTEXT_KWARG!r} among the model's kwargs; "
                         "call model(**gemma4_flexring.hf.shard_inputs(model, ...))")
    out = ring_attention(query, key, value, mask=mask_spec(module), info=ring_context.info,
                         layout=ring_context.layout, group=ring_context.group, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def no_mask(*args, **kwargs) -> None:
    """Mask hook: transformers builds no whole-sequence mask, the ring builds its own per tile."""
    return None


def register() -> None:
    """Make ``attn_implementation="gemma4_flexring"`` available to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, no_mask)


def use_ring_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Route a Gemma 4 model's text attention through the ring, in place; returns ``model``.

    The model first gets config objects of its own (``_own_configs``): transformers keeps the
    attention implementation in the config, which models built from one config object share, so
    switching it in place would switch a reference model built from the same config too. A
    multimodal model keeps its vision and audio towers on their own implementation (they attend
    within one image or clip, unsharded). A forward pre-hook rejects options that cannot work on
    a sharded sequence (``logits_to_keep``).
    """
    register()
    if not getattr(model, "_gemma4_flexring_hooked", False):
        _own_configs(model)
        model.register_forward_pre_hook(_check_model_kwargs, with_kwargs=True)
        model._gemma4_flexring_hooked = True
    multimodal = "text_config" in getattr(model.config, "sub_configs", {})
    model.set_attn_implementation({"text_config": ATTN_IMPLEMENTATION} if multimodal else ATTN_IMPLEMENTATION)
    return model


def _own_configs(model: torch.nn.Module) -> None:
    """Give ``model`` a copy of its config (sub-configs included) and point every submodule that
    held one of the old config objects at its copy."""
    from transformers import PretrainedConfig

    copies: dict[int, PretrainedConfig] = {}

    def pair(old: PretrainedConfig, new: PretrainedConfig) -> None:
        copies[id(old)] = new
        for name, value in vars(old).items():
            if isinstance(value, PretrainedConfig):
                pair(value, getattr(new, name))

    pair(model.config, copy.deepcopy(model.config))
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) in copies:
            module.config = copies[id(config)]


def _check_model_kwargs(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: options that a sharded sequence cannot honour fail with a clear error."""
    keep = kwargs.get("logits_to_keep", 0)
    if CONTEXT_KWARG in kwargs and not (isinstance(keep, int) and keep == 0):
        raise ValueError(f"{ATTN_IMPLEMENTATION}: logits_to_keep={keep!r} is not supported under context "
                         "parallelism (the sequence's last tokens live on one rank, each rank holds a shard); "
                         "leave it at 0 and select the positions you need from the logits")


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


def uses_ring_attention(model: torch.nn.Module) -> bool:
    """Whether ``model``'s text attention goes through the ring (see ``use_ring_attention``)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "_attn_implementation", None) == ATTN_IMPLEMENTATION


_SHARD_FIELDS = ("failed", "batch", "seq_len", "balanced", "layout kind", "world_size",
                 *("batch content (input_ids, position_ids, attention_mask, mm_token_type_ids, labels)",) * 2)


def shard_inputs(model: torch.nn.Module, *, input_ids: Tensor, position_ids: Tensor | None = None,
                 attention_mask: Tensor | None = None, mm_token_type_ids: Tensor | None = None,
                 labels: Tensor | None = None, layout: Layout | str, rank: int, group=None) -> dict:
    """Keyword arguments of one rank's ``model(**kwargs)`` for a whole-sequence batch.

    Every argument is the whole sequence, identical on every rank. Every rank of the group must
    call this for each batch: the ranks agree on the batch's shape, on a digest of its content
    and on every check below (one small all_gather), so that a mistake on one rank, or ranks
    handed different batches, raises on all of them.

    Args:
        layout: a ``Layout``, or ``"balanced"`` for ``Layout.balanced`` of this batch over the
            group (built from its packing; every rank computes the same one). The returned
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
            group's, or ranks that disagree on the batch's shape, content or layout.
    """
    group = process_group(group)
    balanced = isinstance(layout, str) and layout == "balanced"
    # A balanced layout is built from the batch after the checks; a contiguous one stands in for them.
    placement = Layout("contiguous", 1 if group is None else group.size()) if balanced else layout
    problems = _batch_problems(input_ids, position_ids, attention_mask, mm_token_type_ids, labels)
    problems += _placement_problems(placement, rank, group, input_ids.shape[1] if not problems else None)
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
        layout = Layout.balanced(info, placement.world_size)

    def local(t: Tensor) -> Tensor:
        return layout.shard(t, 1, rank).contiguous()

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
