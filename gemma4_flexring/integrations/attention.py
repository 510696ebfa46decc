"""The ring as a transformers attention implementation: ``attn_implementation="gemma4_flexring"``.

- ``register()`` adds the attention function and a mask hook under ``ATTN_IMPLEMENTATION``; the
  hook returns None, so transformers builds no [B, 1, S, S] mask at all.
- ``RingContext`` (whole-sequence ``SequenceInfo``, layout, group) reaches every attention call
  through the model's kwargs under ``CONTEXT_KWARG`` (``inputs.shard_inputs`` puts it there).
- The attention function reads each layer's mask from the module: ``sliding_window``,
  ``is_causal`` and ``config.use_bidirectional_attention`` (see ``mask_spec``).

Shape legend: B batch, S whole sequence, L = S / P local tokens, H heads, D head dim.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor

from ..api import ring_attention
from ..comm import resolve_group
from ..info import SequenceInfo
from ..layout import Layout, layer_mix
from .. import presets
from ..planning.flexmask import FlexMask
from ..planning.masks import MaskSpec

ATTN_IMPLEMENTATION = "gemma4_flexring"
CONTEXT_KWARG = "ring_context"


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


def mask_spec(module: torch.nn.Module, info: SequenceInfo | None = None) -> MaskSpec | FlexMask:
    """The mask of one decoder attention layer, read from the module and its config.

    Gemma 4: sliding layers (``module.sliding_window`` set) get block-bidirectional image blocks
    when ``config.use_bidirectional_attention == "vision"``; global layers stay causal, as in
    transformers' ``create_masks_for_vision_model``. With ``"all"``, ``module.is_causal`` is False.
    Other decoders (Llama, Mistral, Qwen 3, Gemma 3, ...): causal, with the layer's
    ``sliding_window`` attribute as its window, or, on layers that have none (Mistral), the
    config's ``sliding_window``, which then holds for every layer. Llama 4's chunked layers:
    ``chunked_mask`` over the batch ``info``'s documents.

    Raises:
        ValueError: a layer whose attention the ring cannot compute exactly (``unservable``).
    """
    problem = unservable(module)
    if problem is not None:
        raise ValueError(f"{ATTN_IMPLEMENTATION}: {type(module).__name__} {problem}; the ring computes plain "
                         "softmax attention under causal, sliding-window, chunked, document, padding and Gemma 4 "
                         "image masks")
    if (chunk := chunk_size(module)) is not None:
        return chunked_mask(chunk, info)
    window = module.sliding_window if hasattr(module, "sliding_window") else getattr(module.config, "sliding_window", None)
    vision = getattr(module.config, "use_bidirectional_attention", None) == "vision"
    return MaskSpec(causal=bool(module.is_causal), sliding_window=window,
                    block_bidirectional=vision and window is not None)


def chunked_mask(chunk: int, info: SequenceInfo | None) -> FlexMask:
    """Llama 4's chunked attention as transformers computes it: causal chunks of ``chunk``
    positions counted from each packed document's start (``presets.chunked`` over ``info``'s
    documents, None: one document). It shares ``info``'s generation and takes ``info``'s tensor
    only (the chunk is in the factory's name), so every layer's mask of a batch is described once."""
    if info is None:
        return FlexMask(presets.chunked, chunk=torch.tensor(chunk))
    # The factory is made per call (a cache would be one more thing for dynamo to trace around).
    return FlexMask.of_batch(info.generation, functools.partial(presets.chunked, chunk),
                             name=f"{ATTN_IMPLEMENTATION}.chunked_{chunk}", document_ids=info.document_ids)


def chunk_size(module: torch.nn.Module) -> int | None:
    """The chunk of a layer with chunked attention (Llama 4: ``config.attention_chunk_size`` on
    the layers ``config.layer_types`` calls "chunked_attention"), None for other layers."""
    config = module.config
    chunk, types = getattr(config, "attention_chunk_size", None), getattr(config, "layer_types", None)
    if chunk is None or (types is not None and types[module.layer_idx] != "chunked_attention"):
        return None
    return chunk


def unservable(module: torch.nn.Module) -> str | None:
    """Why the ring cannot serve ``module``'s attention exactly, or None: attention sinks, logit
    softcapping, and bidirectional attention outside Gemma 4's variants (an unknown mask: the ring
    would not know which keys to send)."""
    config = module.config
    gemma4 = str(getattr(config, "model_type", "")).startswith("gemma4")
    softcap = getattr(module, "attn_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None)
    if getattr(module, "sinks", None) is not None:
        return "has attention sinks (a learned logit per head joins every softmax)"
    if softcap is not None:
        return f"caps its attention logits (attn_logit_softcapping={softcap})"
    if not gemma4 and (getattr(config, "use_bidirectional_attention", None) or not module.is_causal):
        return "attends bidirectionally, a mask only Gemma 4's variants of it are served with"
    return None


def text_attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of ``model``'s text decoder: those holding its text config and an
    ``is_causal`` flag (a multimodal model's vision and audio towers hold configs of their own)."""
    text = model.config.get_text_config()
    return [m for m in model.modules() if hasattr(m, "is_causal") and getattr(m, "config", None) is text]


def ring_layer_masks(model: torch.nn.Module, info: SequenceInfo | None = None) -> list[MaskSpec | FlexMask]:
    """The mask (``mask_spec``) of each of ``model``'s text attention layers that go through the
    ring, one per layer, in layer order, for the batch ``info`` (chunked layers depend on it)."""
    return [mask_spec(m, info) for m in text_attention_layers(model)
            if getattr(m.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION]


def ring_masks(model: torch.nn.Module, info: SequenceInfo | None = None) -> list[MaskSpec | FlexMask]:
    """The distinct masks of ``model``'s ring layers for the batch ``info``, in layer order: what a
    batch needs planned (``plan_ahead``)."""
    return [mask for mask, _ in ring_layer_mix(model, info)]


def ring_layer_mix(model: torch.nn.Module, info: SequenceInfo | None = None) -> list[tuple[MaskSpec | FlexMask, int]]:
    """``model``'s ring layers as (distinct mask, layer count) pairs for the batch ``info``, in
    layer order (``layer_mix``): the layer mix ``Layout.balanced(..., masks=...)`` weighs (Gemma 4:
    five sliding layers to one global)."""
    return layer_mix(ring_layer_masks(model, info))


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
    spec = mask_spec(module, ring_context.info)
    extra = {name: kwargs[name] for name in ("s_aux", "softcap") if kwargs.get(name) is not None}
    if "sliding_window" in kwargs and kwargs["sliding_window"] != getattr(spec, "sliding_window", None):
        extra["sliding_window"] = kwargs["sliding_window"]
    if extra:
        raise ValueError(f"{ATTN_IMPLEMENTATION}: {type(module).__name__} asks for {sorted(extra)} the ring does not "
                         f"compute (its mask: {spec})")
    out = ring_attention(query, key, value, mask=spec, info=ring_context.info,
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
    """Route a decoder's text attention through the ring, in place; returns ``model``.

    Served: Gemma 4 (``Gemma4ForCausalLM``, ``Gemma4ForConditionalGeneration``) with all its
    masks, and decoders whose layers are causal, with or without a sliding window (Gemma 3, Llama,
    Mistral, Qwen 3) or chunked (Llama 4, through the FlexMask ``presets.chunked``; see
    ``mask_spec``). Refused, before anything changes: layers the ring cannot compute exactly
    (``unservable``: attention sinks, logit softcapping, other bidirectional masks).

    The model first gets config objects of its own (``_own_configs``): transformers keeps the
    attention implementation in the config, which models built from one config object share, so
    switching it in place would switch a reference model built from the same config too. A
    multimodal model keeps its vision and audio towers on their own implementation (they attend
    within one image or clip, unsharded). A forward pre-hook rejects options that cannot work on
    a sharded sequence (``logits_to_keep``).

    Raises:
        ValueError: the model has a layer the ring cannot serve exactly, or no attention layer.
    """
    layers = text_attention_layers(model)
    refused = {f"{type(m).__name__} {problem}" for m in layers if (problem := unservable(m)) is not None}
    if refused or not layers:
        reason = "; ".join(sorted(refused)) or "no attention layers with an is_causal flag were found"
        raise ValueError(f"use_ring_attention: {type(model).__name__} cannot be served exactly by the ring: {reason}")
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


def uses_ring_attention(model: torch.nn.Module) -> bool:
    """Whether ``model``'s text attention goes through the ring (see ``use_ring_attention``)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "_attn_implementation", None) == ATTN_IMPLEMENTATION


