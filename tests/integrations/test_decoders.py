"""transformers decoders beyond Gemma 4 through the ring (``use_ring_attention`` + ``shard_inputs``):
Gemma 3, Llama, Mistral, Qwen 3 and Llama 4 (its chunked layers as a FlexMask) match the same
model on one process with sdpa (logits, the ranks' summed loss, every summed gradient), packed and
padded, at P = 1 and P = 2; models with attention the ring cannot compute exactly are refused
before anything changes."""

from __future__ import annotations

import pytest

from gemma4_flexring import MaskSpec
from gemma4_flexring.integrations import attention
from gemma4_flexring.testing.decoders import REFUSED, SERVED, family_reference, refusal, run_family
from gemma4_flexring.testing.tolerances import DECODERS, relative_error


def assert_matches(ranks, want) -> None:
    logits = ranks[0].layout.unshard([r.logits for r in ranks], dim=1)
    assert relative_error(logits, want.logits) <= DECODERS
    assert relative_error(sum(r.loss for r in ranks), want.loss) <= DECODERS
    assert set(ranks[0].grads) == set(want.grads)
    errors = {n: relative_error(sum(r.grads[n] for r in ranks), g) for n, g in want.grads.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= DECODERS, f"{worst}: {errors[worst]:.1e}"


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("family", SERVED)
def test_a_world_of_one_matches_one_process(family, packed):
    assert_matches([run_family(0, 1, family, packed, "zigzag")], family_reference(family, packed))


@pytest.mark.parametrize("packed, layout", [(True, "balanced"), (False, "zigzag")], ids=["packed", "padded"])
@pytest.mark.parametrize("family", SERVED)
def test_two_ranks_match_one_process(cluster, family, packed, layout):
    assert_matches(cluster(2).run(run_family, family, packed, layout), family_reference(family, packed))


def test_a_wrong_mask_is_caught(monkeypatch):
    """The comparison is sensitive: Llama's layers seen bidirectionally fail it."""
    right = attention.mask_spec
    monkeypatch.setattr(attention, "mask_spec", lambda module, info=None: MaskSpec(False, right(module).sliding_window))
    got, want = run_family(0, 1, "llama", True, "zigzag"), family_reference("llama", True)
    assert relative_error(got.logits, want.logits) > 1e-3


def test_a_window_other_than_the_layer_asks_for_raises(monkeypatch):
    """transformers passes a sliding layer's window to the attention function (Mistral, Qwen 3,
    Gemma 3): a mask read otherwise raises rather than computing another attention."""
    right = attention.mask_spec

    def wider(module, info=None):
        spec = right(module)
        return MaskSpec(spec.causal, spec.sliding_window + 1, spec.block_bidirectional)

    monkeypatch.setattr(attention, "mask_spec", wider)
    with pytest.raises(ValueError, match=r"MistralAttention asks for \['sliding_window'\]"):
        run_family(0, 1, "mistral", True, "zigzag")


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_attention_the_ring_cannot_compute_exactly_is_refused(family):
    assert REFUSED[family] in refusal(family)


def test_a_left_padded_batch_for_chunked_attention_is_refused():
    """Llama 4 counts its chunks from each row's first real token: a left-padded batch raises
    rather than chunking another way."""
    from gemma4_flexring import Layout, hf
    from gemma4_flexring.testing.decoders import family_batch, family_model

    batch = family_batch(packed=False)
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    model = hf.use_ring_attention(family_model("llama4"))
    with pytest.raises(ValueError, match="left-padded and the model has chunked attention"):
        hf.shard_inputs(model, **batch, layout=Layout("zigzag", 1), rank=0)
