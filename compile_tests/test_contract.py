"""The compile and export contract on training-like data: every batch changes its length and which
metadata it holds (documents, image blocks, padding, each present or absent), and nothing
recompiles past warm-up, fails, or serves another batch's masks.

Shape legend: B batch rows, S whole sequence length.
"""

from __future__ import annotations

import itertools

import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.export import Dim, ShapesCollection

from gemma4_flexring import Layout, SequenceInfo
from gemma4_flexring.integrations import transformers as hf
from gemma4_flexring.testing import tiny_gemma4
from gemma4_flexring.testing.cases import training_info
from gemma4_flexring.testing.compiled import Stack, compiled_ring_steps, make_hidden, max_error, run_step

# Which of (documents, image blocks, padding) a batch holds: all 8 patterns.
PATTERNS = list(itertools.product((False, True), repeat=3))


def patterned_info(seq_len: int, pattern: tuple[bool, bool, bool], batch: int = 2) -> SequenceInfo:
    """``training_info``'s metadata with the fields ``pattern`` leaves out absent (None)."""
    fields = training_info(seq_len, batch).tensors()
    return SequenceInfo(*(t if keep else None for t, keep in zip(fields, pattern)), shape=(batch, seq_len))


def test_twelve_batches_every_pattern_at_most_two_frames():
    """fullgraph, default dynamic setting, 12 batches over lengths and all 8 metadata patterns:
    at most 2 frames, no recompile after the second batch, each step equal to eager."""
    model = Stack(num_layers=3)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    lengths = (16, 24, 32, 40, 48, 56, 64, 72, 88, 112, 20, 36)
    for step, seq_len in enumerate(lengths):
        info = patterned_info(seq_len, PATTERNS[step % len(PATTERNS)])
        hidden = make_hidden(seq_len)
        with torch.compiler.set_stance("fail_on_recompile" if step >= 2 else "default"):
            got = run_step(compiled, hidden, info=info)
        assert max_error(got, run_step(model, hidden, info=info)) < 1e-6, (step, seq_len)
    assert counter.frame_count <= 2


def test_explicit_layouts_differing_every_batch_at_most_two_frames():
    """A layout is a tensor argument: 12 batches, each with another random permutation of its
    positions as the layout (one rank holds them all, in that order), compile at most 2 frames and
    equal eager; the layout is what changes the local token order."""
    model = Stack(num_layers=3)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for step, seq_len in enumerate((16, 24, 24, 32, 32, 40, 48, 48, 56, 64, 64, 72)):
        info = training_info(seq_len, seed=step)
        layout = Layout.from_positions(torch.randperm(seq_len, generator=torch.Generator().manual_seed(step)), 1)
        hidden = layout.shard(make_hidden(seq_len), 1, 0)
        kwargs = dict(info=info, layout=layout, position_ids=layout.positions(seq_len, 0).expand(2, -1))
        with torch.compiler.set_stance("fail_on_recompile" if step >= 2 else "default"):
            got = run_step(compiled, hidden, **kwargs)
        assert max_error(got, run_step(model, hidden, **kwargs)) < 1e-6, (step, seq_len)
    assert counter.frame_count <= 2


def test_balanced_layouts_on_two_ranks_at_most_two_frames(cluster):
    """Two ranks, a compiled stack, every batch with its own packing and its balanced layout
    (batches of equal length among them with other layouts): at most 2 frames, no recompile after
    the second batch, each step equal to eager."""
    lengths = (32, 48, 48, 64, 64, 64, 80, 96)
    for result in cluster(2).run(compiled_ring_steps, "aot_eager", None, 2, 3, lengths, "balanced"):
        assert result["frames"] <= 2, result
        assert result["distinct_layouts"] > len(set(lengths)), result  # some equal lengths, other layouts
        assert result["max_error"] < 1e-5, result


def _gemma4_batch(seq_len: int, pattern: tuple[bool, bool, bool], seed: int) -> dict:
    """Whole-sequence inputs of the tiny multimodal Gemma 4 with the metadata ``pattern`` holds."""
    documents, images, padding = pattern
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(10, tiny_gemma4.VOCAB, (2, seq_len), generator=g)
    batch = {"input_ids": input_ids}
    if documents:
        cut = seq_len // 3 + seed % 5
        batch["position_ids"] = torch.cat([torch.arange(cut), torch.arange(seq_len - cut)]).view(1, -1)
    if images:
        types = torch.zeros(2, seq_len, dtype=torch.long)
        types[:, seq_len // 4: seq_len // 2] = 1  # bidirectional blocks; the token ids stay text
        batch["mm_token_type_ids"] = types
    if padding:
        mask = torch.ones(2, seq_len, dtype=torch.long)
        mask[1, -3:] = 0
        batch["attention_mask"] = mask
    return batch


def test_tiny_gemma4_each_layer_compiled_sixteen_batches():
    """transformers' Gemma 4 with every decoder layer compiled on its own (the large-model recipe),
    16 batches over lengths and every metadata pattern: at most 2 frames per layer, never a
    failure, logits equal to the eager model's on every batch."""
    torch.manual_seed(0)
    model = _multimodal_model()
    counters = []
    for layer in model.model.language_model.layers:
        counters.append(CompileCounterWithBackend("aot_eager"))
        layer.compile(backend=counters[-1], fullgraph=True)
    eager = _multimodal_model()
    layout = Layout("contiguous", 1)
    for step in range(16):
        seq_len = 24 + 4 * step
        batch = _gemma4_batch(seq_len, PATTERNS[step % len(PATTERNS)], step)
        kwargs = hf.shard_inputs(model, **batch, layout=layout, rank=0)
        with torch.no_grad():
            got = model(**kwargs).logits
            want = eager(**hf.shard_inputs(eager, **batch, layout=layout, rank=0)).logits
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert all(c.frame_count <= 2 for c in counters), [c.frame_count for c in counters]


def _multimodal_model() -> torch.nn.Module:
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(0)
    return hf.use_ring_attention(Gemma4ForConditionalGeneration(tiny_gemma4.multimodal_config()).double().eval())


class _Logits(torch.nn.Module):
    """A Gemma 4 model as an exportable function of its sharded inputs and ring context."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, mm_token_type_ids, ring_context):
        return self.model(input_ids=input_ids, position_ids=position_ids, mm_token_type_ids=mm_token_type_ids,
                          ring_context=ring_context, use_cache=False).logits


def _export_inputs(model: torch.nn.Module, seq_len: int, pattern, seed: int) -> dict:
    batch = _gemma4_batch(seq_len, pattern, seed)
    batch.setdefault("mm_token_type_ids", torch.zeros(2, seq_len, dtype=torch.long))
    kwargs = hf.shard_inputs(model, **batch, layout=Layout("contiguous", 1), rank=0)
    return {name: kwargs[name] for name in ("input_ids", "position_ids", "mm_token_type_ids", "ring_context")}


def test_whole_gemma4_exports_with_a_dynamic_length(tmp_path):
    """A whole tiny Gemma 4 on the ring exports with a dynamic sequence dimension; after
    save/load, two loaded copies give the eager logits on other lengths and every pattern."""
    module = _Logits(_multimodal_model())
    example = _export_inputs(module.model, 32, (True, True, True), seed=0)
    seq = Dim("seq", min=8, max=4096)
    shapes = ShapesCollection()
    for t in (example["input_ids"], example["position_ids"], example["mm_token_type_ids"],
              *example["ring_context"].info.tensors()):
        shapes[t] = {1: seq}
    program = torch.export.export(module, (), example, dynamic_shapes=shapes)
    assert program.graph_module.code.count("torch.ops.gemma4_flexring.ring_attention.default") == 4
    torch.export.save(program, tmp_path / "gemma4.pt2")
    loaded = [torch.export.load(tmp_path / "gemma4.pt2").module() for _ in range(2)]
    for step, pattern in enumerate(PATTERNS):
        inputs = _export_inputs(module.model, 20 + 4 * step, pattern, seed=step)
        want = module(**inputs)
        for copy in loaded:
            torch.testing.assert_close(copy(**inputs), want, rtol=1e-12, atol=1e-12)
