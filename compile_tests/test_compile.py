"""torch.compile of models calling ring_attention: fullgraph, numerics, frames over changing lengths.

Every step uses a new length and a fresh SequenceInfo; the compiled step (forward + backward) is
compared with the same model run eagerly on the same inputs. Inductor compiles are the slow part
of the suite, so the inductor cases use a one-layer model and every step after warm-up reuses
the (at most two) compiled graphs.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from gemma4_flexring import MaskSpec, SequenceInfo, mask_cache_info, ring_attention
from gemma4_flexring.testing.reference import reference_attention
from gemma4_flexring.testing.cases import training_info
from gemma4_flexring.testing.compiled import (LENGTHS, Stack, attend, compile_configs, compiled_ring_steps,
                                              dynamo_graphs, steps_under_compile)
from gemma4_flexring.testing.tolerances import COMPILED


def _run(backend: str, dynamic: bool | None, num_layers: int) -> tuple[dict, CompileCounterWithBackend, int]:
    model = Stack(num_layers)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=dynamic)
    graphs = dynamo_graphs()
    warmup = 1 if dynamic else 2
    result = steps_under_compile(model, compiled, LENGTHS, warmup)
    return result, counter, dynamo_graphs() - graphs


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
@pytest.mark.parametrize("dynamic", [None, True], ids=["default", "dynamic"])
def test_ten_lengths(backend, dynamic):
    """10 steps, 10 lengths, fresh SequenceInfo each: fullgraph, <= 2 frames (1 with dynamic=True),
    no recompile after warm-up (fail_on_recompile), forward and backward match eager."""
    configs = compile_configs()
    result, counter, graphs = _run(backend, dynamic, num_layers=1)
    assert result["max_error"] < COMPILED[backend]
    if dynamic:
        assert counter.frame_count == 1
    else:
        assert 1 <= counter.frame_count <= 2
    # Every graph dynamo captured is one of the counted frames: nothing inside the op compiled.
    assert graphs == counter.frame_count
    assert compile_configs() == configs  # no process-global dynamo / inductor setting left changed


def test_op_body_compiles_nothing():
    """On CPU the op body holds no compiled code: 10 lengths of eager ring attention (forward and
    backward, fresh metadata each) capture no dynamo graph and change no compile setting."""
    configs = compile_configs()
    graphs = dynamo_graphs()
    for seq_len in LENGTHS:
        info = training_info(seq_len)
        q, k, v = (torch.randn(2, h, seq_len, 8, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
        grad = torch.randn_like(q)
        out = attend(q, k, v, info)
        got = (out, *torch.autograd.grad(out, (q, k, v), grad))
        want = reference_attention(q, k, v, MaskSpec(sliding_window=4), info, scale=1.0)
        torch.testing.assert_close(got, (want, *torch.autograd.grad(want, (q, k, v), grad)))
    assert dynamo_graphs() == graphs
    assert compile_configs() == configs


def _packed(q, k, v, position_ids):
    # Metadata derived inside the compiled region, as a model forward would: its generation
    # must be fresh on every call without being guarded on.
    info = SequenceInfo.from_hf(position_ids=position_ids)
    return attend(q, k, v, info), info.generation


def _positions(seq_len: int, starts: tuple[int, ...]) -> torch.Tensor:
    position_ids = torch.arange(seq_len)
    for start in starts:
        position_ids[start:] -= position_ids[start].clone()
    return position_ids.view(1, -1)


def test_sequence_info_built_inside_compiled_code():
    """SequenceInfo.from_hf inside the compiled function: no guard on the generation counter or the
    lengths (<= 2 frames, fail_on_recompile after warm-up), every call gets a fresh generation, and
    same-shape calls with different documents get their own masks."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_packed, backend=counter, fullgraph=True)
    generations = []
    calls = [(s, (s // 3, s // 2)) for s in LENGTHS] + [(LENGTHS[-1], (5,)), (LENGTHS[-1], ())]
    for step, (seq_len, starts) in enumerate(calls):
        position_ids = _positions(seq_len, starts)
        q, k, v = (torch.randn(1, h, seq_len, 8, dtype=torch.float64) for h in (4, 2, 2))
        with torch.compiler.set_stance("fail_on_recompile" if step >= 2 else "default"):
            out, generation = compiled(q, k, v, position_ids)
        info = SequenceInfo.from_hf(position_ids=position_ids)
        want = reference_attention(q, k, v, MaskSpec(sliding_window=4), info, scale=1.0)
        torch.testing.assert_close(out, want)
        generations.append(int(generation))
    assert counter.frame_count <= 2
    assert generations == sorted(set(generations))  # strictly increasing: fresh on every call


def test_without_metadata():
    """No SequenceInfo (absent metadata made per call): one frame under dynamic=True, no
    recompile over four lengths, forward matches eager exactly, one plan per length."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attend, backend=counter, fullgraph=True, dynamic=True)
    for seq_len in LENGTHS[:4]:
        q, k, v = (torch.randn(2, h, seq_len, 8, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
        stance = "fail_on_recompile" if seq_len != LENGTHS[0] else "default"
        with torch.compiler.set_stance(stance):
            out = compiled(q, k, v)
        torch.testing.assert_close(out, attend(q, k, v), rtol=0, atol=0)
    assert counter.frame_count == 1
    assert mask_cache_info().builds == 4


@pytest.mark.parametrize("backend, dynamic, num_layers, lengths", [
    ("aot_eager", None, 3, LENGTHS),
    ("inductor", True, 1, LENGTHS[:3]),
], ids=["aot_eager-default", "inductor-dynamic"])
def test_two_ranks(cluster, backend, dynamic, num_layers, lengths):
    """Zigzag ring over two gloo ranks under torch.compile: frames, no recompile, matches eager."""
    warmup = 1 if dynamic else 2
    for result in cluster(2).run(compiled_ring_steps, backend, dynamic, warmup, num_layers, lengths):
        assert result["max_error"] < COMPILED[backend]
        assert (result["frames"] == 1) if dynamic else (1 <= result["frames"] <= 2)
        assert result["graphs"] == result["frames"]
        # Per step and rank: one build per (mask, key/value owner), every other lookup a hit.
        distinct = result["distinct_masks"] * 2
        assert result["builds"] == [distinct] * len(lengths)
        assert result["hits"] == [result["num_layers"] * 2 * 2 - distinct] * len(lengths)


def test_ring_attention_call_is_one_graph_node():
    """The whole call (argument handling, defaults, group lookup) traces to one op call; without a
    SequenceInfo, the absent metadata and a generation are made in the graph, at run time."""
    gm_holder = []

    def backend(gm, example_inputs):
        gm_holder.append(gm)
        return gm

    q, k, v = (torch.randn(1, h, 8, 4) for h in (2, 1, 1))
    torch.compile(lambda q, k, v: ring_attention(q, k, v), backend=backend, fullgraph=True)(q, k, v)
    targets = [str(n.target) for n in gm_holder[0].graph.nodes if n.op == "call_function"]
    assert targets.count("gemma4_flexring.ring_attention") == 1
    assert targets.count("gemma4_flexring.new_generation.default") == 1
