"""Tiny transformers decoders other than Gemma 4, for the tests of ``use_ring_attention`` beyond it:
the families served (Gemma 3, Llama, Mistral, Qwen 3, Llama 4) and some it refuses (attention
sinks, logit softcapping).

Every process builds the same float64 model from the same seed. Each served family has a
sliding window of 8 somewhere (all layers for Mistral, alternate layers for Gemma 3 and Qwen 3;
none for Llama) or chunks of 16 (Llama 4's first three layers), so that windows and chunks cross
rank boundaries at S = 48.

Shape legend: B batch rows, S whole sequence, L = S / P this rank's tokens, V vocabulary.
"""

from __future__ import annotations

import torch

from .. import Layout
from ..integrations import transformers as hf
from .tiny_gemma4 import Result, single_thread

SEQ_LEN, BATCH, VOCAB, WINDOW = 48, 2, 128, 8
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, pad_token_id=0)
ALTERNATE = ["sliding_attention", "full_attention"] * 2


def family_model(family: str) -> torch.nn.Module:
    """``family``'s tiny decoder in float64, seeded, on sdpa (eager for the refused families, some
    of which have no sdpa); no KV cache in training."""
    import transformers as t

    configs = {
        "llama": lambda: (t.LlamaForCausalLM, t.LlamaConfig(**COMMON)),
        "mistral": lambda: (t.MistralForCausalLM, t.MistralConfig(**COMMON, sliding_window=WINDOW)),
        "qwen3": lambda: (t.Qwen3ForCausalLM, t.Qwen3Config(**COMMON, sliding_window=WINDOW, use_sliding_window=True,
                                                            layer_types=ALTERNATE)),
        "gemma3": lambda: (t.Gemma3ForCausalLM, t.Gemma3TextConfig(**COMMON, sliding_window=WINDOW,
                                                                    layer_types=ALTERNATE)),
        "gpt_oss": lambda: (t.GptOssForCausalLM, t.GptOssConfig(**{**COMMON, "num_local_experts": 2},
                                                                  sliding_window=WINDOW, layer_types=ALTERNATE)),
        "gemma2": lambda: (t.Gemma2ForCausalLM, t.Gemma2Config(**COMMON, sliding_window=WINDOW)),
        "llama4": lambda: (t.Llama4ForCausalLM, t.Llama4TextConfig(**COMMON, attention_chunk_size=16)),
    }
    cls, config = configs[family]()
    config.use_cache = False
    config._attn_implementation = "eager" if family in REFUSED else "sdpa"
    torch.manual_seed(0)
    return cls(config).to(torch.float64)


SERVED = ("llama", "mistral", "qwen3", "gemma3", "llama4")
REFUSED = {"gpt_oss": "attention sinks", "gemma2": "caps its attention logits"}


def family_batch(packed: bool) -> dict[str, torch.Tensor]:
    """Random tokens [B, S]; ``packed``: documents start at 13 and 30 (row 0) and 21 (row 1),
    else row 1 ends in 7 padding tokens (``attention_mask``, labels -100)."""
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(1, VOCAB, (BATCH, SEQ_LEN), generator=g)
    labels = input_ids.clone()
    if packed:
        position_ids = torch.stack([torch.cat([torch.arange(n) for n in lengths])
                                    for lengths in ([13, 17, 18], [21, 27])])
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    attention_mask = torch.ones(BATCH, SEQ_LEN, dtype=torch.long)
    attention_mask[1, -7:] = 0
    labels = labels.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask,
            "labels": labels}


def _result(model: torch.nn.Module, out) -> Result:
    out.loss.backward()
    return Result(out.logits.detach(), out.loss.detach(),
                  {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def family_reference(family: str, packed: bool) -> Result:
    """One process, sdpa, the whole sequence (transformers' own document masks from the packed
    ``position_ids``, or its padding mask)."""
    model = family_model(family)
    with single_thread():
        return _result(model, model(**family_batch(packed)))


def run_family(rank: int, world_size: int, family: str, packed: bool, layout: str) -> Result:
    """This rank's logits [B, L, V], loss share and gradient share through the ring."""
    model = hf.use_ring_attention(family_model(family))
    kwargs = hf.shard_inputs(model, **family_batch(packed), layout=layout if layout == "balanced"
                             else Layout(layout, world_size), rank=rank)
    with single_thread():
        result = _result(model, model(**kwargs))
    return Result(result.logits, result.loss, result.grads, kwargs[hf.CONTEXT_KWARG].layout)


def refusal(family: str) -> str:
    """The message ``use_ring_attention`` raises for ``family``."""
    try:
        hf.use_ring_attention(family_model(family))
    except ValueError as e:
        return str(e)
    raise AssertionError(f"{family} was not refused")
