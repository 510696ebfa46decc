"""transformers integration (``gemma4_flexring.hf``): Gemma 4 under context parallelism, in your
own loop, with FSDP2, or with transformers' ``Trainer``.

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

This module gathers the public names of the rooms below it:

- ``attention``: the attention function, its mask hook and ``RingContext`` (``register``,
  ``use_ring_attention``, ``mask_spec``, ``ATTN_IMPLEMENTATION``, ``CONTEXT_KWARG``).
- ``inputs``: ``shard_inputs`` (labels shifted on the whole sequence, the loss normalized by the
  global target count, so per-rank losses add up), ``shift_labels``, ``shard_token_features``.
- ``fsdp``: data × context parallelism in your own loop (``cp_mesh``, ``fully_shard_model``,
  ``replicate_model``, ``scale_loss_to_global_batch``); FSDP2 / DDP reduce the gradients themselves.
- ``trainer``: ``RingTrainer`` (a ``transformers.Trainer``) and ``RingTrainerMixin`` for trainers
  built on it, such as TRL's ``SFTTrainer``; imported on first use.

Shape legend: B batch, S whole sequence, P ranks, L = S / P local tokens, V vocabulary.
"""

from __future__ import annotations

from .attention import (ATTN_IMPLEMENTATION, CONTEXT_KWARG, RingContext, attention_forward,  # noqa: F401
                        mask_spec, no_mask, register, ring_layer_mix, ring_masks, use_ring_attention,
                        uses_ring_attention)
from .data_parallel import CPMesh, cp_mesh, fully_shard_model, replicate_model, scale_loss_to_global_batch  # noqa: F401
from .inputs import IGNORE_INDEX, shard_inputs, shard_token_features, shift_labels  # noqa: F401


def __getattr__(name: str):
    """``RingTrainer`` and ``RingTrainerMixin``, from ``trainer`` on first use (the Trainer's import
    takes seconds)."""
    if name == "RingTrainerMixin":
        from .trainer import RingTrainerMixin

        return RingTrainerMixin
    if name == "RingTrainer":
        from .trainer import ring_trainer_class

        return ring_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
