"""transformers integration: Gemma 4 under CP with ``attn_implementation="gemma4_flexring"``.

Every case runs a tiny random float64 Gemma 4 (sliding and global layers) on 2 and 3 gloo ranks
in every layout (zigzag, contiguous, and balanced from each batch), and compares with one transformers run on the whole sequence (sdpa,
use_cache=False): logits, the loss (per-rank losses summed) and every parameter gradient
(per-rank gradients summed).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import AttentionInterface, Gemma4ForCausalLM
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from gemma4_flexring import Layout, MaskSpec, SequenceInfo
from gemma4_flexring.integrations import attention
from gemma4_flexring.integrations import transformers as hf
from gemma4_flexring.testing.tiny_gemma4 import (CASES, SEQ_LEN, WINDOW, Batch, make_batch, make_model, reference, run_cp,
                                                 shard_kwargs, text_config)
from gemma4_flexring.testing.tolerances import TRANSFORMERS, relative_error

LOGITS_TOLERANCE, LOSS_RTOL, GRAD_RTOL = TRANSFORMERS["logits"], TRANSFORMERS["loss"], TRANSFORMERS["grads"]


@pytest.fixture(scope="module")
def references():
    return {name: reference(case) for name, case in CASES.items()}


@pytest.fixture(scope="module")
def cp_results(cluster):
    """``cp_results(world_size, layout)``: every case's per-rank results, one cluster call each."""
    cache = {}

    def get(world_size: int, layout: str):
        if (world_size, layout) not in cache:
            cache[world_size, layout] = cluster(world_size).run(run_cp, list(CASES), layout)
        return cache[world_size, layout]

    return get


@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "balanced"])
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_one_process(references, cp_results, name, world_size, layout):
    want = references[name]
    ranks = [r[list(CASES).index(name)] for r in cp_results(world_size, layout)]
    assert all(r.layout == ranks[0].layout for r in ranks)  # every rank built the same layout
    logits = ranks[0].layout.unshard([r.logits for r in ranks], dim=1)
    assert (logits - want.logits).abs().max().item() <= LOGITS_TOLERANCE
    loss = sum(r.loss for r in ranks)
    assert abs(loss.item() - want.loss.item()) <= LOSS_RTOL * want.loss.item()
    assert set(ranks[0].grads) == set(want.grads)
    errors = {n: relative_error(sum(r.grads[n] for r in ranks), g) for n, g in want.grads.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_RTOL, f"{worst}: {errors[worst]:.1e}"


@pytest.mark.parametrize("layout", ["zigzag", "balanced"])
def test_a_batch_planned_ahead_matches_one_process_without_planning_on_the_path(references, cluster, layout):
    """``shard_inputs(plan_ahead=True)``: every mask of the model planned on the background thread
    (the sliding layers' with image blocks, the global layers'), the step plans nothing itself."""
    names = ["vision_packed_padded", "packed"]
    ranks = cluster(2).run(run_cp, names, layout, True)
    for i, name in enumerate(names):
        want, got = references[name], [r[i] for r in ranks]
        assert [r.planning_s for r in got] == [0.0, 0.0]
        logits = got[0].layout.unshard([r.logits for r in got], dim=1)
        assert (logits - want.logits).abs().max().item() <= LOGITS_TOLERANCE
        errors = {n: relative_error(sum(r.grads[n] for r in got), g) for n, g in want.grads.items()}
        assert max(errors.values()) <= GRAD_RTOL


@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "balanced"])
def test_shard_inputs_on_ranks(cluster, layout):
    """Local tokens in layout order, global positions, labels shifted before sharding."""
    batch = make_batch(packed=True, padded=True, images=True)
    parts = cluster(3).run(shard_kwargs, layout)
    sharding = parts[0]["layout"]
    if layout == "balanced":
        info = SequenceInfo.from_hf(batch.attention_mask, batch.position_ids, batch.mm_token_type_ids)
        mix = hf.ring_layer_mix(make_model(CASES["vision_packed_padded"], ring=True))
        assert sharding == Layout.balanced(info, 3, masks=mix) and sharding != Layout("zigzag", 3)
    for rank, kwargs in enumerate(parts):
        assert torch.equal(kwargs["position_ids"], sharding.shard(batch.position_ids, 1, rank))
        assert kwargs["input_ids"].is_contiguous() and kwargs["shift_labels"].is_contiguous()
        assert kwargs["use_cache"] is False
    for key in ("input_ids", "mm_token_type_ids"):
        assert torch.equal(sharding.unshard([p[key] for p in parts], dim=1), getattr(batch, key))
    labels = sharding.unshard([p["labels"] for p in parts], dim=1)
    assert torch.equal(labels, hf.shift_labels(batch.labels, batch.attention_mask))
    assert all(int(p["num_items_in_batch"]) == int((labels != -100).sum()) for p in parts)


def test_world_of_one_matches_one_process():
    """Without torch.distributed the ring is a world of one: same model, same numbers."""
    want = reference(CASES["vision_packed_padded"])
    got, = run_cp(0, 1, ["vision_packed_padded"], "zigzag")
    assert (got.logits - want.logits).abs().max().item() <= LOGITS_TOLERANCE
    assert abs(got.loss.item() - want.loss.item()) <= LOSS_RTOL * want.loss.item()
    for n, g in want.grads.items():
        assert relative_error(got.grads[n], g) <= GRAD_RTOL, n


@pytest.mark.parametrize("case_name, wrong", [
    ("vision_padded", lambda spec: MaskSpec(spec.causal, spec.sliding_window, False)),
    ("packed", lambda spec: MaskSpec(False, spec.sliding_window)),
])
def test_a_wrong_mask_is_caught(monkeypatch, case_name, wrong):
    """The comparison is sensitive: one image block seen causally, or layers seen bidirectionally,
    fail it (a window other than the layer's raises: ``test_decoders.py``)."""
    want = reference(CASES[case_name])
    right = hf.mask_spec
    monkeypatch.setattr(attention, "mask_spec", lambda module, info=None: wrong(right(module)))
    got, = run_cp(0, 1, [case_name], "zigzag")
    assert (got.logits - want.logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("bidirectional, sliding", [
    (None, MaskSpec(True, WINDOW)),
    ("vision", MaskSpec(True, WINDOW, block_bidirectional=True)),
    ("all", MaskSpec(False, WINDOW // 2 + 1)),  # transformers halves the window for "all"
])
def test_mask_spec_per_layer(bidirectional, sliding):
    """Sliding layers: window (and image blocks with "vision"); global layers: no window, causal unless "all"."""
    model = Gemma4ForCausalLM(text_config(bidirectional))
    specs = [hf.mask_spec(layer.self_attn) for layer in model.model.layers]
    glob = MaskSpec(causal=bidirectional != "all")
    assert specs == [sliding, glob, sliding, glob]


def test_register_installs_attention_and_no_mask():
    """transformers builds no whole-sequence mask for the ring: the hook returns None."""
    hf.register()
    assert AttentionInterface()[hf.ATTN_IMPLEMENTATION] is hf.attention_forward
    config = text_config(attn_implementation=hf.ATTN_IMPLEMENTATION)
    embeds = torch.zeros(2, SEQ_LEN, 32)
    attention_mask = torch.ones(2, SEQ_LEN, dtype=torch.long)
    position_ids = torch.arange(SEQ_LEN).expand(2, -1)
    for build in (create_causal_mask, create_sliding_window_causal_mask):
        # The cache argument: "cache" in recent transformers (its old name warns), "past_key_values" before.
        no_cache = {"cache" if "cache" in inspect.signature(build).parameters else "past_key_values": None}
        assert build(config=config, inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                     **no_cache) is None


def test_use_ring_attention_keeps_the_vision_tower():
    model = make_model(CASES["vision_padded"], ring=True)
    assert model.config.get_text_config()._attn_implementation == hf.ATTN_IMPLEMENTATION
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_shift_labels():
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, -100, -100]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert hf.shift_labels(labels).tolist() == [[2, 3, 4, 5, -100], [7, 8, -100, -100, -100]]
    left_padded = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    # A padding position predicts nothing, even a real next token.
    assert hf.shift_labels(labels, left_padded).tolist() == [[-100, -100, 4, 5, -100], [7, 8, -100, -100, -100]]
    assert hf.shift_labels(labels, attention_mask).tolist() == [[2, 3, 4, 5, -100], [7, 8, -100, -100, -100]]


def test_dropout_raises_before_any_exchange():
    model = hf.use_ring_attention(Gemma4ForCausalLM(text_config(attention_dropout=0.1)))
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        model(**hf.shard_inputs(model, **CASES["packed"].batch().model_kwargs(), layout=Layout("zigzag", 1), rank=0))
    model.eval()  # no dropout at evaluation
    model(**hf.shard_inputs(model, **CASES["packed"].batch().model_kwargs(), layout=Layout("zigzag", 1), rank=0))


def test_logits_to_keep_is_rejected_under_context_parallelism():
    model = make_model(CASES["packed"], ring=True)
    kwargs = hf.shard_inputs(model, **CASES["packed"].batch().model_kwargs(), layout=Layout("zigzag", 1), rank=0)
    with pytest.raises(ValueError, match="logits_to_keep=1 is not supported under context parallelism"):
        model(**kwargs, logits_to_keep=1)


def test_shard_inputs_needs_a_model_on_the_ring():
    batch = CASES["packed"].batch()
    with pytest.raises(ValueError, match="use_ring_attention"):
        hf.shard_inputs(make_model(CASES["packed"], ring=False), **batch.model_kwargs(), layout=Layout("zigzag", 1),
                        rank=0)


def test_missing_context_raises():
    model = make_model(CASES["packed"], ring=True)
    with pytest.raises(ValueError, match="shard_inputs"):
        model(input_ids=torch.ones(1, 8, dtype=torch.long), use_cache=False)


def _batch() -> Batch:
    return make_batch(packed=True, padded=True, images=False)


@pytest.mark.parametrize("change, error, match", [
    (dict(input_ids=torch.ones(2, 46, dtype=torch.long), labels=None, position_ids=None, attention_mask=None,
          layout=Layout("zigzag", 2)), ValueError, "multiple of 4"),
    (dict(layout=Layout("zigzag", 2), rank=2), ValueError, "rank"),
    (dict(layout="zigzag"), TypeError, "Layout"),
    (dict(labels=torch.ones(2, 47, dtype=torch.long)), ValueError, "labels"),
    (dict(position_ids=[0, 1]), TypeError, "position_ids"),
    (dict(input_ids=torch.ones(SEQ_LEN, dtype=torch.long)), ValueError, "input_ids"),
    (dict(layout=Layout("zigzag", 2), rank=0), ValueError, "the group has 1"),
])
def test_shard_inputs_rejects_bad_input(change, error, match):
    batch = _batch()
    kwargs = dict(input_ids=batch.input_ids, labels=batch.labels, position_ids=batch.position_ids,
                  attention_mask=batch.attention_mask, layout=Layout("zigzag", 1), rank=0)
    with pytest.raises(error, match=match):
        hf.shard_inputs(make_model(CASES["packed"], ring=True), **{**kwargs, **change})


def test_shard_token_features_gives_each_rank_its_rows_in_local_order():
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, [1, 2, 6]] = True
    features = torch.arange(3.0).unsqueeze(1)
    zigzag = Layout("zigzag", 2)  # rank 0 holds tokens 0, 1, 6, 7; rank 1 tokens 2..5
    assert hf.shard_token_features(features, mask, zigzag, 0).flatten().tolist() == [0.0, 2.0]
    assert hf.shard_token_features(features, mask, zigzag, 1).flatten().tolist() == [1.0]
    with pytest.raises(ValueError, match="N=3"):
        hf.shard_token_features(torch.zeros(4, 1), mask, zigzag, 0)


def test_balanced_context_is_a_pytree_with_its_permutation_as_a_leaf():
    """shard_inputs(layout="balanced") builds the layout from the batch; the context flattens to
    tensors (the layout's permutation among them) and a JSON-serializable spec, and comes back equal."""
    import torch.utils._pytree as pytree

    batch = make_batch(packed=True, padded=True, images=True)
    model = make_model(CASES["vision_packed_padded"], ring=True)
    kwargs = hf.shard_inputs(model, **batch.model_kwargs(), layout="balanced", rank=0)
    context = kwargs[hf.CONTEXT_KWARG]
    info = SequenceInfo.from_hf(batch.attention_mask, batch.position_ids, batch.mm_token_type_ids)
    assert context.layout == Layout.balanced(info, 1, masks=hf.ring_layer_mix(model))
    leaves, spec = pytree.tree_flatten(context)
    assert any(leaf is context.layout.permutation for leaf in leaves)
    back = pytree.tree_unflatten(leaves, pytree.treespec_loads(pytree.treespec_dumps(spec)))
    assert back.layout == context.layout and back.layout.kind == "balanced"
    assert torch.equal(context.layout.unshard([kwargs["input_ids"]], dim=1), batch.input_ids)


def test_switching_one_model_switches_no_other_built_from_its_config():
    """transformers keeps the attention implementation in the config, which models built from one
    config object share: the ring model gets configs of its own, so a reference model built from
    the same config before or after stays on its attention and runs without a ring context."""
    config = text_config()
    before = Gemma4ForCausalLM(config)
    ring = hf.use_ring_attention(Gemma4ForCausalLM(config))
    after = Gemma4ForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (1, 16))
    for model in (before, after):
        assert not hf.uses_ring_attention(model)
        assert model(input_ids=ids, use_cache=False).logits.shape == (1, 16, config.vocab_size)
    assert config._attn_implementation != hf.ATTN_IMPLEMENTATION
    attention = [m for m in ring.modules() if isinstance(getattr(m, "config", None), type(config))]
    assert attention and all(m.config._attn_implementation == hf.ATTN_IMPLEMENTATION for m in attention)
    assert hf.use_ring_attention(ring) is ring and hf.uses_ring_attention(ring)  # again: no second copy


def _shard_other_tokens(rank: int, world_size: int, group, model) -> dict:
    """Rank 1 gets other tokens with the same packing, padding and labels' positions."""
    batch = _batch()
    ids = batch.input_ids if rank == 0 else (batch.input_ids + 1) % text_config().vocab_size
    return hf.shard_inputs(model, input_ids=ids, labels=batch.labels, position_ids=batch.position_ids,
                           attention_mask=batch.attention_mask, layout=Layout("zigzag", world_size), rank=rank,
                           group=group)


def test_ranks_handed_different_tokens_raise_together_naming_the_likely_cause():
    """A CP group whose ranks got different batches with the same packing (a sampler that splits
    the batch over CP ranks) raises on every rank before any step, and says what likely happened."""
    from gemma4_flexring.testing.simulated import SimulatedGroup

    group, model = SimulatedGroup(2), make_model(CASES["packed"], ring=True)
    errors = []

    def step(rank: int, world_size: int):
        try:
            _shard_other_tokens(rank, world_size, group, model)
        except ValueError as e:
            errors.append(str(e))

    group.run(step)
    assert len(errors) == 2 and errors[0] == errors[1]
    assert "ranks disagree on batch content" in errors[0] and "sampler or data loader" in errors[0]
    same = group.run(lambda rank, world_size: hf.shard_inputs(
        model, **_batch().model_kwargs(), layout=Layout("zigzag", world_size), rank=rank, group=group))
    assert [kwargs["input_ids"].shape for kwargs in same] == [(2, SEQ_LEN // 2)] * 2
