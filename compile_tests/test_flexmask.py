"""FlexMasks under torch.compile and torch.export: the factory travels by name, its tensors as
graph inputs, so new tensors every batch (values and lengths) add no frame past warm-up, and an
exported program serves any tensors.

Shape legend: B batch rows, H heads, S sequence length, D head dim.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.export import Dim, ShapesCollection

from gemma4_flexring import FlexMask, SequenceInfo, presets, ring_attention

LENGTHS = (16, 24, 24, 32, 40, 48, 48, 56, 64, 64, 72, 80)


def _batch(seq_len: int, step: int) -> tuple:
    """q, k, v [2, 2, S, 8] float64 (requiring grad), a per-row prefix [2], global-token flags
    [2, S] and packed documents, all drawn from ``step``."""
    g = torch.Generator().manual_seed(step)
    q, k, v = (torch.randn(2, 2, seq_len, 8, dtype=torch.float64, generator=g).requires_grad_(True) for _ in range(3))
    flags = torch.zeros(2, seq_len, dtype=torch.bool)
    flags[:, (3 * step) % seq_len] = True
    info = SequenceInfo(document_ids=(torch.arange(seq_len) // (5 + step % 4)).expand(2, seq_len))
    return q, k, v, torch.tensor([step % 7, seq_len // 2]), flags, info


def given(q, k, v, mask, info):
    """Attention under a FlexMask built outside the compiled code."""
    return ring_attention(q, k, v, mask=mask, info=info)


def built_inside(q, k, v, prefix, is_global, info):
    """Two layers whose FlexMasks are built inside the compiled code from its tensor inputs."""
    global_layer = ring_attention(q, k, v, mask=FlexMask(presets.global_tokens, is_global=is_global), info=info)
    return global_layer + ring_attention(q, k, v, mask=FlexMask(presets.prefix_lm, prefix=prefix), info=info)


@pytest.mark.parametrize("where", ["given", "built_inside"])
def test_new_tensors_every_batch_at_most_two_frames(where):
    """fullgraph, 12 batches whose FlexMask tensors change in value and length: at most 2 frames,
    no recompile after the second batch, forward and gradients equal to eager."""
    counter = CompileCounterWithBackend("aot_eager")
    fn = given if where == "given" else built_inside
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for step, seq_len in enumerate(LENGTHS):
        q, k, v, prefix, flags, info = _batch(seq_len, step)
        args = (FlexMask(presets.prefix_lm, prefix=prefix),) if where == "given" else (prefix, flags)
        with torch.compiler.set_stance("fail_on_recompile" if step >= 2 else "default"):
            got = compiled(q, k, v, *args, info)
            got_grads = torch.autograd.grad(got.pow(2).sum(), (q, k, v))
        want = fn(q, k, v, *args, info)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(got_grads, torch.autograd.grad(want.pow(2).sum(), (q, k, v))):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert counter.frame_count <= 2


class _Layers(torch.nn.Module):
    def forward(self, q, k, v, prefix, is_global):
        return built_inside(q, k, v, prefix, is_global, None)


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_export_with_flexmask_tensors_as_inputs(tmp_path, strict):
    """Exported at one length, the program (and its save/load round trip) runs FlexMasks of other
    tensors and lengths, equal to eager; the factories are named in the graph, never traced."""
    example = tuple(t.detach() for t in _batch(16, 0)[:5])
    seq = Dim("seq", min=4, max=4096)
    shapes = ShapesCollection()
    for t in example[:3]:
        shapes[t] = {2: seq}
    shapes[example[4]] = {1: seq}
    program = torch.export.export(_Layers(), example, dynamic_shapes=shapes, strict=strict)
    code = program.graph_module.code
    assert code.count("torch.ops.gemma4_flexring.ring_attention.default") == 2
    assert "gemma4_flexring.presets.prefix_lm|prefix" in code
    torch.export.save(program, tmp_path / "flex.pt2")
    loaded = torch.export.load(tmp_path / "flex.pt2").module()
    for step, seq_len in enumerate((24, 40, 12), start=1):
        inputs = tuple(t.detach() for t in _batch(seq_len, step)[:5])
        want = _Layers()(*inputs)
        for module in (program.module(), loaded):
            torch.testing.assert_close(module(*inputs), want, rtol=1e-12, atol=1e-12)


def test_llama4_layers_compiled_with_their_chunked_flexmasks():
    """transformers' Llama 4 on the ring, each decoder layer compiled on its own (fullgraph): its
    chunked layers build their FlexMask from the batch inside the compiled code; packed and
    padded batches in turn compile at most 2 frames per layer and give the eager logits."""
    from gemma4_flexring import Layout, hf
    from gemma4_flexring.testing.decoders import family_batch, family_model

    model, eager = (hf.use_ring_attention(family_model("llama4")) for _ in range(2))
    counters = [CompileCounterWithBackend("aot_eager") for _ in model.model.layers]
    for layer, counter in zip(model.model.layers, counters):
        layer.compile(backend=counter, fullgraph=True)
    for step in range(4):
        batch = family_batch(packed=step % 2 == 0)
        with torch.no_grad():
            got = model(**hf.shard_inputs(model, **batch, layout=Layout("zigzag", 1), rank=0)).logits
            want = eager(**hf.shard_inputs(eager, **batch, layout=Layout("zigzag", 1), rank=0)).logits
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all(c.frame_count <= 2 for c in counters), [c.frame_count for c in counters]
