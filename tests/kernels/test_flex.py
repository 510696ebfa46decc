"""The flex chunk kernel on CPU (eager, slow: tiny shapes): ring parity against the float64
reference for every mask feature, world sizes 1-3, both layouts, GQA, rows with no key,
head dims 256 and 512 in bf16; kernel names checked on every rank; the compiled path's guards
and settings scope (checked with dynamo on CPU); CUDA-only checks skip without a GPU."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from gemma4_flexring import Layout, MaskSpec, SequenceInfo, ring_attention
from gemma4_flexring.kernels import KERNELS, default_kernel, kernel_problem
from gemma4_flexring.kernels import flex_hops
from gemma4_flexring.kernels.flex import FlexKernel
from gemma4_flexring.planning.flex_calls import SegmentPair, block_mask_from_flags
from gemma4_flexring.planning.masks import offset_mask_mod
from gemma4_flexring.testing.cases import Case
from gemma4_flexring.testing.misuse import bad_kernel_on_rank_zero
from gemma4_flexring.testing.reference import reference_gradients
from gemma4_flexring.testing.simulated import SimulatedGroup
from gemma4_flexring.testing.tolerances import RING
from gemma4_flexring.testing.workers import reference, run_cases

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

# Every mask feature: causal, window (causal and symmetric), vision blocks, documents, padding
# (incl. a padded last document: rows with no key anywhere), no mask at all; GQA 4:2 and MQA;
# FlexMasks.
FLEX_CASES = [
    Case("causal", "none", kernel="flex"),
    Case("sliding", "vision", kernel="flex"),
    Case("sliding_vision", "all", kernel="flex"),
    Case("causal_vision", "packed_padded", kernel="flex"),
    Case("bidirectional", "none", kernel="flex"),
    Case("bidirectional_window", "padding", kernel="flex"),
    Case("causal", "documents", q_heads=6, kv_heads=1, scale=1.0, kernel="flex"),
    Case("sliding_vision", "all", torch.float32, kernel="flex"),
    # Small blocks: several runs of key blocks per segment pair, halos in whole blocks.
    Case("sliding", "none", seq_len=96, block_size=8, kernel="flex"),
    Case("sliding_vision", "all", seq_len=96, block_size=8, kernel="flex"),
    Case("bidirectional_window", "packed_padded", seq_len=96, block_size=8, kernel="flex"),
    # FlexMasks: the user's mask_mod (closing over its tensors) inside the flex calls' BlockMasks.
    Case("flex_prefix_lm", "packed_padded", kernel="flex"),
    Case("flex_global_window", "none", kernel="flex"),
    Case("flex_block_diffusion", "padding", seq_len=96, block_size=8, kernel="flex"),
]
# Gemma 4's head dims, low precision in, float32 LSE and merge.
HEAD_DIM_CASES = [
    Case("sliding_vision", "all", torch.bfloat16, seq_len=24, batch=1, head_dim=256, kernel="flex"),
    Case("causal", "documents", torch.bfloat16, seq_len=24, batch=1, head_dim=512, kernel="flex"),
    Case("causal", "packed_padded", torch.float16, seq_len=24, batch=1, head_dim=256, kernel="flex"),
]


def _check(cases, results, world_size, layout):
    """Each case's (out, dq, dk, dv), unsharded, within ``RING`` of the float64 reference, relative to
    max(1, the reference's largest magnitude)."""
    sharding = Layout(layout, world_size)
    failures = []
    for index, case in enumerate(cases):
        for name, part, want in zip(("out", "dq", "dk", "dv"), range(4), reference(case)):
            got = sharding.unshard([results[r][index][part] for r in range(world_size)], dim=2)
            assert got.dtype == case.dtype
            err = (got.to(torch.float64) - want).abs().max().item()
            if not err <= RING[case.dtype] * max(1.0, want.abs().max().item()):
                failures.append(f"{world_size} {layout} {case} {name}: max error {err:.3g}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_flex_matches_dense_reference(cluster, world_size, layout):
    if world_size == 1:
        results = [run_cases(0, 1, FLEX_CASES, layout)]
    else:
        results = cluster(world_size).run(run_cases, FLEX_CASES, layout)
    _check(FLEX_CASES, results, world_size, layout)


def test_flex_gemma4_head_dims_low_precision():
    results = [run_cases(0, 1, HEAD_DIM_CASES, "zigzag")]
    _check(HEAD_DIM_CASES, results, 1, "zigzag")


def test_flex_and_aten_agree_in_float64():
    case = Case("sliding_vision", "all")
    flex, aten = (run_cases(0, 1, [replace(case, kernel=k)], "zigzag")[0] for k in ("flex", "aten"))
    for a, b in zip(flex, aten):
        assert (a - b).abs().max() < 1e-12


def test_dead_rows_have_zero_output_and_gradients():
    """Padded queries of the last document see no key: zero out and dq on the flex path."""
    case = Case("causal", "packed_padded", kernel="flex")
    out, dq, dk, dv = run_cases(0, 1, [case], "contiguous")[0]
    dead = slice(case.seq_len * 7 // 8, None)
    assert out[-1, :, dead].abs().max() == 0 and dq[-1, :, dead].abs().max() == 0
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_kernel_names():
    assert default_kernel(torch.device("cpu")) == "aten"
    assert default_kernel(torch.device("cuda")) == "flex"
    assert kernel_problem("", torch.device("cpu")) is None
    assert kernel_problem("flex", torch.device("cpu")) is None
    assert "cannot run on device type 'cuda'" in kernel_problem("aten", torch.device("cuda"))
    assert "unknown kernel 'triton'" in kernel_problem("triton", torch.device("cpu"))
    assert "cannot run on device type 'mps'" in kernel_problem("", torch.device("mps"))
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        ring_attention(q, q, q, kernel="nope")
    with pytest.raises(TypeError, match="kernel must be a str"):
        ring_attention(q, q, q, kernel=1)


def test_bad_kernel_raises_on_every_rank(cluster):
    errors = cluster(2).errors(bad_kernel_on_rank_zero, "nope")
    assert [name for name, _ in errors] == ["ValueError", "ValueError"]
    assert all("unknown kernel 'nope'" in message for _, message in errors)


def _pair(length: int, offset: int) -> SegmentPair:
    docs = torch.zeros(1, 256, dtype=torch.long)
    docs[:, 100:] = 1

    def same_doc_causal(b, h, i, j):
        return (j <= i) & (docs[b, i] == docs[b, j])

    mod = offset_mask_mod(same_doc_causal, torch.tensor(offset), torch.tensor(offset))
    blocks = -(-length // 16)
    flags = torch.ones(1, 1, blocks, blocks, dtype=torch.bool)
    mask = block_mask_from_flags(flags, torch.zeros_like(flags), 16, mod, (length, length))
    return SegmentPair(slice(0, length), slice(0, length), mask)


def test_compiled_path_neither_recompiles_per_length_nor_leaks_settings():
    """The CUDA path's compile, run with dynamo on CPU: one graph per direction for every length
    and offset; it compiles under the user's fail_on_recompile stance, and leaves the user's
    dynamo settings as they were."""
    forward_counter, backward_counter = CompileCounter(), CompileCounter()
    kernel = FlexKernel(compile_backend=forward_counter)
    kernel._compiled = (kernel._compiled[0], FlexKernel(compile_backend=backward_counter)._compiled[1])
    eager = FlexKernel()
    limit = torch._dynamo.config.recompile_limit
    with torch.compiler.set_stance("fail_on_recompile"):
        for length, offset in [(40, 0), (56, 40), (72, 100), (33, 5)]:
            q, k, v = torch.randn(1, 4, length, 8), torch.randn(1, 2, length, 8), torch.randn(1, 2, length, 8)
            pair = _pair(length, offset)
            out, lse = kernel.forward(q, k, v, pair, 0.5)
            want_out, want_lse = eager.forward(q, k, v, pair, 0.5)
            assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
            grad = torch.randn_like(out)
            got = kernel.backward(grad, q, k, v, out, lse, pair, 0.5)
            want = eager.backward(grad, q, k, v, out, lse, pair, 0.5)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    # torch 2.11's dynamo cannot trace the backward HOP: it runs eagerly there (flex_hops).
    assert (forward_counter.frame_count, backward_counter.frame_count) == (1, int(flex_hops.BACKWARD_COMPILES))
    assert torch._dynamo.config.recompile_limit == limit


@pytest.mark.skipif(flex_hops.BACKWARD_COMPILES, reason="torch >= 2.12 compiles the backward")
def test_eager_backward_of_a_compiled_kernel_says_so():
    """On torch 2.11 a compiled kernel's backward runs eagerly, exact, with a RuntimeWarning."""
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8)
    pair, kernel = _pair(40, 0), FlexKernel(compile_backend="eager")
    out, lse = kernel.forward(q, k, v, pair, 0.5)
    grad = torch.randn_like(out)
    with pytest.warns(RuntimeWarning, match="torch >= 2.12 compiles it"):
        got = kernel.backward(grad, q, k, v, out, lse, pair, 0.5)
    want = FlexKernel().backward(grad, q, k, v, out, lse, pair, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_compiled_flex_through_the_ring_compiles_nothing_new_for_new_packings(monkeypatch):
    """The CUDA path's compile on the CPU, through a simulated ring of 4 (sliding window, zigzag):
    batches packed differently give calls of other lengths and offsets, and no new graph; the
    numbers are those of the eager kernel and of the float64 reference, gradients included."""
    counter = CompileCounter()
    compiled_kernel, eager = FlexKernel(compile_backend=counter), FlexKernel()
    layout, spec, seq_len = Layout("zigzag", 4), MaskSpec(causal=True, sliding_window=512), 2048
    g = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(9):
        cuts = torch.randint(1, seq_len, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        q, k, v = torch.randn(1, 2, seq_len, 8, generator=g), *torch.randn(2, 1, 1, seq_len, 8, generator=g)
        documents = torch.zeros(1, seq_len, dtype=torch.long)
        for cut in cuts:
            documents[:, cut:] += 1
        info = SequenceInfo(document_ids=documents)
        results = []
        for kernel in (compiled_kernel, eager):
            monkeypatch.setitem(KERNELS, "flex", kernel)
            group = SimulatedGroup(4)

            def step(rank, world_size):
                local = [layout.shard(t, 2, rank).clone().requires_grad_(True) for t in (q, k, v)]
                out = ring_attention(*local, mask=spec, info=info, layout=layout, group=group, kernel="flex")
                out.sum().backward()
                return [out.detach(), *(t.grad for t in local)]

            results.append(group.run(step))
        assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for ra, rb in zip(*results) for a, b in zip(ra, rb))
        want = reference_gradients(q, k, v, torch.ones_like(q), spec, info)  # the gradient of out.sum()
        for part, expected in enumerate(want):
            got = layout.unshard([r[part] for r in results[0]], dim=2)
            assert (got.double() - expected).abs().max().item() <= RING[torch.float32], part
        counts.append(counter.frame_count)
    assert counts[1:] == counts[:-1], counts


def test_registry():
    assert set(KERNELS) == {"aten", "flex"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_uses_compiled_flex():
    from gemma4_flexring.kernels import flex

    calls = []
    compiled_forward = flex._CUDA_FORWARD

    def spy(*args):
        calls.append(1)
        return compiled_forward(*args)

    flex._CUDA_FORWARD = spy
    try:
        q = torch.randn(1, 4, 256, 256, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 2, 256, 256, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out = ring_attention(q, k, v, mask=MaskSpec(sliding_window=64))
    finally:
        flex._CUDA_FORWARD = compiled_forward
    assert calls and out.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim", [64, 256, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_flex_matches_reference(head_dim, dtype):
    from gemma4_flexring.tools import selfcheck

    result = selfcheck.parity(torch.device("cuda"), head_dim, dtype, seq_len=512, kernel="flex")
    assert result["ok"], result
