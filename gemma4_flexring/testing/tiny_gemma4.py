"""Tiny random Gemma 4 models (transformers), whole-sequence batches and the per-rank workers of the
transformers and FSDP2 tests; the tiny configs are the demo's too.

Every process builds the same float64 model from the same seed, so the gloo workers and the
one-process reference in the test process hold identical weights without sending any.

Shape legend: B batch rows, S whole sequence, L = S / P this rank's tokens, V vocabulary.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import (Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig,
                          Gemma4VisionConfig)
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

from .. import Layout, MaskSpec, SequenceInfo, clear_mask_cache, ring_stats
from ..ahead import wait_for_planning
from ..integrations import transformers as hf
from .reference import reference_mask
from .tolerances import relative_norm_error

TINY_LAYER_TYPES = ("sliding_attention", "full_attention") * 2


def tiny_text_config(hidden_size: int, head_dim: int, window: int, vocab_size: int, bidirectional: str | None = None,
                     pad_token_id: int = 0, **overrides) -> Gemma4TextConfig:
    """A tiny Gemma 4 text stack: 4 layers (sliding, global, sliding, global), 4 query and 2 K/V
    heads, global heads twice as wide, per-layer inputs; ``overrides`` replace any field."""
    fields = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=len(TINY_LAYER_TYPES), num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        global_head_dim=2 * head_dim, sliding_window=window, layer_types=list(TINY_LAYER_TYPES),
        vocab_size_per_layer_input=vocab_size, hidden_size_per_layer_input=hidden_size // 4,
        final_logit_softcapping=30.0, pad_token_id=pad_token_id, use_bidirectional_attention=bidirectional)
    return Gemma4TextConfig(**{**fields, **overrides})


def tiny_config(text: Gemma4TextConfig, image_token_id: int) -> Gemma4Config:
    """``text`` (a ``tiny_text_config``) with a one-layer vision tower: a multimodal Gemma 4."""
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=8, patch_size=2, pooling_kernel_size=2,
                                position_embedding_size=64)
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=image_token_id,
                        boi_token_id=6, eoi_token_id=7, video_token_id=8, audio_token_id=9)


SEQ_LEN = 48  # splits into 4 and 6 equal pieces: zigzag over 2 and 3 ranks
BATCH = 2
WINDOW = 8
VOCAB = 128
IMAGE_TOKEN = 5


def text_config(bidirectional: str | None = None, **overrides) -> Gemma4TextConfig:
    """The tiny stack at the tests' sizes and vocabulary."""
    return tiny_text_config(hidden_size=32, head_dim=8, window=WINDOW, vocab_size=VOCAB, bidirectional=bidirectional,
                            **overrides)


def multimodal_config() -> Gemma4Config:
    """The text stack with ``use_bidirectional_attention="vision"`` and a one-layer vision tower."""
    return tiny_config(text_config("vision"), image_token_id=IMAGE_TOKEN)


@dataclass(frozen=True)
class Batch:
    """A whole-sequence batch, [B, S] each (None when absent)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    mm_token_type_ids: torch.Tensor | None = None

    def model_kwargs(self) -> dict:
        names = ("input_ids", "labels", "position_ids", "attention_mask", "mm_token_type_ids")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def packed_positions(boundaries: list[list[int]]) -> torch.Tensor:
    """[B, S] position ids that restart at each row's document boundaries."""
    rows = []
    for cuts in boundaries:
        starts = [0, *cuts]
        lengths = [b - a for a, b in zip(starts, [*cuts, SEQ_LEN])]
        rows.append(torch.cat([torch.arange(n) for n in lengths]))
    return torch.stack(rows)


def make_batch(packed: bool, padded: bool, images: bool, seed: int = 1) -> Batch:
    """Random tokens; documents, padding and image blocks cross rank boundaries.

    Row 0: documents start at 13 and 30; an image block of 14 tokens (longer than the window)
    at 9..22, across a document start (documents still separate). Row 1: a document starts at
    21; image blocks at 4..9 and 26..31; 7 padding tokens at the end.
    """
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(10, VOCAB, (BATCH, SEQ_LEN), generator=g)
    position_ids = packed_positions([[13, 30], [21]]) if packed else None
    attention_mask = mm_token_type_ids = None
    if images:
        mm_token_type_ids = torch.zeros(BATCH, SEQ_LEN, dtype=torch.long)
        mm_token_type_ids[0, 9:23] = 1
        mm_token_type_ids[1, 4:10] = 1
        mm_token_type_ids[1, 26:32] = 1
        input_ids = input_ids.masked_fill(mm_token_type_ids == 1, IMAGE_TOKEN)
    labels = input_ids.clone()
    if images:
        labels = labels.masked_fill(mm_token_type_ids == 1, -100)
    if padded:
        attention_mask = torch.ones(BATCH, SEQ_LEN, dtype=torch.long)
        attention_mask[1, -7:] = 0
        input_ids = input_ids.masked_fill(attention_mask == 0, 0)
        labels = labels.masked_fill(attention_mask == 0, -100)
    return Batch(input_ids, labels, position_ids, attention_mask, mm_token_type_ids)


@dataclass(frozen=True)
class Case:
    """One comparison: a model kind, a batch, and how the one-process reference gets its masks.

    ``explicit_masks``: the reference runs on masks built from ``reference_mask`` (for batches
    whose mask transformers cannot build: packing with padding, packing with images, packing
    with bidirectional attention); otherwise transformers builds its own masks.
    ``image_features``: the image tokens get soft-token features (a leaf [N, hidden], standing in
    for the vision tower's output) through ``mm_encoder_outputs``; their gradient is compared too.
    """

    name: str
    multimodal: bool = False
    bidirectional: str | None = None
    packed: bool = False
    padded: bool = False
    explicit_masks: bool = False
    image_features: bool = False

    def config(self):
        return multimodal_config() if self.multimodal else text_config(self.bidirectional)

    def batch(self) -> Batch:
        return make_batch(self.packed, self.padded, images=self.multimodal)

    def layer_specs(self) -> dict[str, MaskSpec]:
        """The intended mask of each layer type, written out independently of ``hf.mask_spec``."""
        text = self.config().get_text_config()
        causal = text.use_bidirectional_attention != "all"
        vision = text.use_bidirectional_attention == "vision"
        return {"full_attention": MaskSpec(causal=causal),
                "sliding_attention": MaskSpec(causal=causal, sliding_window=text.sliding_window,
                                              block_bidirectional=vision)}


CASES = {c.name: c for c in [
    Case("packed", packed=True),
    Case("padded", padded=True),
    Case("packed_padded", packed=True, padded=True, explicit_masks=True),
    Case("bidirectional_padded", bidirectional="all", padded=True),
    Case("bidirectional_packed", bidirectional="all", packed=True, explicit_masks=True),
    Case("vision_padded", multimodal=True, padded=True),
    Case("vision_packed_padded", multimodal=True, packed=True, padded=True, explicit_masks=True),
    Case("vision_features", multimodal=True, packed=True, padded=True, explicit_masks=True, image_features=True),
]}


def make_model(case: Case, ring: bool) -> torch.nn.Module:
    """The case's model in float64, seeded; its text attention is the ring or sdpa."""
    torch.manual_seed(0)
    cls = Gemma4ForConditionalGeneration if case.multimodal else Gemma4ForCausalLM
    model = cls(case.config()).to(torch.float64)
    return hf.use_ring_attention(model) if ring else model


def explicit_masks(case: Case, batch: Batch) -> dict[str, torch.Tensor]:
    """Per layer type, the allowed pairs as bool [B, 1, S, S], from the dense reference mask."""
    info = SequenceInfo.from_hf(batch.attention_mask, batch.position_ids, batch.mm_token_type_ids)
    return {kind: reference_mask(spec, info, BATCH, SEQ_LEN).unsqueeze(1)
            for kind, spec in case.layer_specs().items()}


@dataclass
class Result:
    """Logits [B, S or L, V], loss, and every parameter gradient by name (plus "image_features")."""

    logits: torch.Tensor
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    layout: Layout | None = None  # the layout a CP rank's inputs were sharded with
    planning_s: float = 0.0  # seconds a CP rank's forward and backward spent planning (on the path)


def image_features(batch: Batch) -> torch.Tensor:
    """Seeded features of every image token, [N, hidden], requiring grad."""
    count = int((batch.input_ids == IMAGE_TOKEN).sum())
    g = torch.Generator().manual_seed(2)
    return torch.randn(count, 32, generator=g, dtype=torch.float64).requires_grad_(True)


def image_outputs(features: torch.Tensor) -> dict:
    return {"image": BaseModelOutputWithPooling(pooler_output=(features,))}


def _result(model: torch.nn.Module, out, features: torch.Tensor | None = None) -> Result:
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    if features is not None:
        grads["image_features"] = features.grad
    return Result(out.logits.detach(), out.loss.detach(), grads)


@contextmanager
def single_thread():
    """Tiny models run fastest on one thread; on a busy machine extra OpenMP threads cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference(case: Case) -> Result:
    """One transformers run on the whole sequence: sdpa, no cache, the model's own loss."""
    batch = case.batch()
    model = make_model(case, ring=False)
    kwargs = batch.model_kwargs()
    if case.explicit_masks:
        kwargs["attention_mask"] = explicit_masks(case, batch)
    features = image_features(batch) if case.image_features else None
    if features is not None:
        kwargs["mm_encoder_outputs"] = image_outputs(features)
    with single_thread():
        return _result(model, model(**kwargs, use_cache=False), features)


def run_cp(rank: int, world_size: int, names: list[str], layout_kind: str, plan_ahead: bool = False
           ) -> list[Result]:
    """This rank's logits [B, L, V], loss share and gradient share for each named case; "balanced"
    lets ``shard_inputs`` build the layout from each batch. ``plan_ahead``: the batch is planned
    by ``shard_inputs(plan_ahead=True)``, waited for, before the model runs."""
    results = []
    for name in names:
        case, batch = CASES[name], CASES[name].batch()
        model = make_model(case, ring=True)
        layout = "balanced" if layout_kind == "balanced" else Layout(layout_kind, world_size)
        clear_mask_cache()
        kwargs = hf.shard_inputs(model, **batch.model_kwargs(), layout=layout, rank=rank, plan_ahead=plan_ahead)
        wait_for_planning()
        layout = kwargs[hf.CONTEXT_KWARG].layout
        features = image_features(batch) if case.image_features else None
        if features is not None:
            local = hf.shard_token_features(features, batch.input_ids == IMAGE_TOKEN, layout, rank)
            kwargs["mm_encoder_outputs"] = image_outputs(local)
        before = ring_stats().planning_s
        with single_thread():
            result = _result(model, model(**kwargs), features)
        results.append(Result(result.logits, result.loss, result.grads, layout, ring_stats().planning_s - before))
    return results


def shard_kwargs(rank: int, world_size: int, layout_kind: str) -> dict:
    """This rank's ``shard_inputs`` for the multimodal packed, padded batch; the context is replaced
    by its layout (``"layout"``)."""
    batch = make_batch(packed=True, padded=True, images=True)
    model = make_model(CASES["vision_packed_padded"], ring=True)
    layout = "balanced" if layout_kind == "balanced" else Layout(layout_kind, world_size)
    kwargs = hf.shard_inputs(model, **batch.model_kwargs(), layout=layout, rank=rank)
    kwargs["layout"] = kwargs.pop(hf.CONTEXT_KWARG).layout
    return kwargs


def keep_float64(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model``'s float32 islands compute in its own dtype, on this model only; returns it.

    transformers runs two steps of a float64 Gemma 4 in float32: every ``Gemma4RMSNorm``
    (``hidden_states.float()``, ``weight.float()``) and the causal-LM loss (``logits.float()``).
    Their float32 rounding differs with the way a batch is split (a norm weight's gradient is a
    float32 sum over the tokens, the loss a float32 sum over the targets), which leaves one process
    and a correct data × context parallel run about 1e-7 apart. A comparison at 1e-9 patches both,
    on both sides: the norms' ``forward`` (instance attribute) and the model's ``loss_function``.
    """
    for module in model.modules():
        if isinstance(module, Gemma4RMSNorm):
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)
    model.loss_function = _causal_lm_loss_in_logits_dtype
    return model


def _rms_norm_in_input_dtype(self: Gemma4RMSNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    """``Gemma4RMSNorm.forward`` without its float32 casts."""
    normed = self._norm(hidden_states)
    return normed * self.weight if self.with_scale else normed


def _causal_lm_loss_in_logits_dtype(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                                    num_items_in_batch: torch.Tensor | None = None, ignore_index: int = -100,
                                    shift_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` without its ``logits.float()``.

    Shapes: logits [B, S, V]; labels, shift_labels [B, S] (unshifted, shifted).
    """
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return fixed_cross_entropy(logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device),
                               num_items_in_batch, ignore_index)


def data_parallel_batch(dp_rank: int) -> Batch:
    """The packed batch of CP group ``dp_rank`` (its own tokens, the ``packed`` case's packing)."""
    return make_batch(packed=True, padded=False, images=False, seed=1 + dp_rank)


def fsdp_reference(dp: int) -> Result:
    """One process on the global batch (every CP group's rows, [dp * B, S]): the model's mean loss
    over all targets, float64 throughout (``keep_float64``), transformers' document masks from the
    packed ``position_ids`` (no attention_mask, no cache)."""
    batches = [data_parallel_batch(d).model_kwargs() for d in range(dp)]
    kwargs = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    model = keep_float64(make_model(CASES["packed"], ring=False))
    with single_thread():
        return _result(model, model(**kwargs, use_cache=False))


@dataclass
class FsdpStep:
    """One rank's step of the FSDP2 recipe.

    Attributes:
        loss: this rank's loss share (0-dim); the world's shares add up to the global mean loss.
        grads: every parameter's full gradient by name, gathered from the shards.
        attention_runs: how many times the first decoder layer's attention ran (2 with activation
            checkpointing: the forward and the recompute).
        frames: graphs dynamo compiled on this rank (0 eagerly).
    """

    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    attention_runs: int
    frames: int


def run_fsdp(rank: int, world_size: int, dp: int, cp: int, checkpointing: bool, compile: bool | str,
             wrap: str = "fsdp") -> FsdpStep:
    """One step of the data × context parallel recipe on a dp × cp mesh, CP group d on
    ``data_parallel_batch(d)``, float64 throughout (``keep_float64``). ``wrap``: "fsdp"
    (``hf.fully_shard_model``, with ``checkpointing`` and ``compile``) or "ddp" (``hf.replicate_model``)."""
    # A rank that stays up: earlier calls' frames would count toward the recompile limit, and toward
    # the frame count returned (dynamo's counters outlive ``reset``).
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    mesh = hf.cp_mesh(dp, cp)
    model = keep_float64(make_model(CASES["packed"], ring=True))
    runs = torch.zeros((), dtype=torch.long)  # a tensor: compiled code counts without a guard on the count

    def count(module, args) -> None:
        runs.add_(1)

    model.model.layers[0].self_attn.register_forward_pre_hook(count)
    if wrap == "fsdp":
        wrapped = hf.fully_shard_model(model, mesh, checkpointing=checkpointing, compile=compile)
    else:
        wrapped = hf.replicate_model(model, mesh)
    batch = data_parallel_batch(mesh.dp_rank)
    kwargs = hf.shard_inputs(model, **batch.model_kwargs(), layout="balanced", rank=mesh.cp_rank,
                             group=mesh.cp_group)
    with single_thread():
        out = wrapped(**hf.scale_loss_to_global_batch(kwargs, mesh))
        out.loss.backward()
    grads = {n: p.grad.full_tensor() if wrap == "fsdp" else p.grad
             for n, p in model.named_parameters() if p.grad is not None}
    return FsdpStep(out.loss.detach(), grads, int(runs), torch._dynamo.utils.counters["stats"]["unique_graphs"])


def fsdp_errors(steps: list[FsdpStep], want: Result) -> tuple[float, dict[str, float]]:
    """How far the FSDP2 ranks are from one process: the relative error of the ranks' summed loss,
    and per parameter the largest ``relative_norm_error`` of a rank's full gradient."""
    loss = sum(step.loss for step in steps)
    grads = {n: max(relative_norm_error(step.grads[n], g) for step in steps) for n, g in want.grads.items()}
    return abs(loss.item() - want.loss.item()) / abs(want.loss.item()), grads


def mesh_ranks(rank: int, world_size: int, dp: int, cp: int) -> dict:
    """``hf.cp_mesh(dp, cp)`` as this rank sees it: the global ranks of its CP and dp groups and of
    the mesh FSDP2 shards over, its CP and dp rank."""
    import torch.distributed as dist

    mesh = hf.cp_mesh(dp, cp)
    return {"cp_group": dist.get_process_group_ranks(mesh.cp_group),
            "dp_group": dist.get_process_group_ranks(mesh.dp_group),
            "shard_mesh": mesh.shard_mesh.mesh.tolist(), "cp_rank": mesh.cp_rank, "dp_rank": mesh.dp_rank}
