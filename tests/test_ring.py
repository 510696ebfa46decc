"""Ring attention against the dense float64 reference: forward and all three gradients,
world sizes 1-4, every layout (contiguous, zigzag, balanced; balanced for a Gemma-4-like stack), every
mask feature alone and combined, FlexMasks (every preset, documents, masks users write),
GQA, float32/float64 (and bfloat16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemma4_flexring.testing.cases import EXCHANGE_CASES, FLEX_MASKS, INFOS, SPECS, Case, make_layout
from gemma4_flexring.testing.tolerances import RING
from gemma4_flexring.testing.workers import mesh_matches_default_group, planning_sizes, reference, run_cases

FLOAT32_CASES = [
    Case("causal", "none", torch.float32),
    Case("sliding_vision", "all", torch.float32),
    Case("bidirectional_window", "packed_padded", torch.float32),
    Case("sliding_vision", "all", torch.bfloat16),  # merged in float32
]
SHAPE_CASES = [
    Case("sliding_vision", "all", q_heads=4, kv_heads=4),      # MHA
    Case("sliding_vision", "all", q_heads=6, kv_heads=1),      # MQA
    Case("causal", "documents", batch=1, scale=1.0),            # Gemma 4's scale
    Case("sliding", "vision", seq_len=96, head_dim=16, seed=3),
    # Small blocks: multi-block tiles get cropped, skipped and classified block by block.
    Case("sliding_vision", "all", seq_len=96, block_size=4),
    Case("causal", "none", seq_len=96, block_size=4),
    Case("bidirectional_window", "padding", seq_len=96, block_size=8),
    Case("sliding_vision", "all", strided=True),
]
# Pieces (``exchange.Piece``) of 12 or 10 rows on 8-row blocks: tiles cut inside blocks, causal
# squares cut on the diagonal, dK/dV sent home in several pieces per step.
PIECE_CASES = [
    Case("causal", "none", seq_len=96, block_size=8, piece_rows=12),
    Case("sliding_vision", "all", seq_len=96, block_size=8, piece_rows=12),
    Case("bidirectional_window", "packed_padded", torch.float32, seq_len=96, block_size=8, piece_rows=10),
    Case("causal", "documents", seq_len=192, block_size=8, piece_rows=16),
    Case("causal", "packed_padded", seq_len=96, block_size=4, piece_rows=10),  # document bands, cut
]
# Blocks of 4: documents are cut into stretches, planned one by one (causal squares in bands of
# rows, full rectangles across segments), with rows packed differently, padding and images.
DOCUMENT_CASES = [
    Case("causal", "documents", seq_len=96, block_size=4),
    Case("causal", "packed_padded", seq_len=96, block_size=4),
    Case("sliding", "documents", seq_len=96, block_size=4),       # window narrower than the documents
    Case("sliding_wide", "documents", seq_len=96, block_size=4),  # window wider than some of them
    Case("causal_vision", "all", seq_len=96, block_size=4),
    Case("bidirectional", "packed_padded", seq_len=96, block_size=4),
]
# FlexMasks: every preset (documents as a preset's argument, and from the metadata), masks users
# write (shared prefix, block diffusion), with padding and images (which a FlexMask ignores),
# float32, small blocks and GQA shapes; "balanced" weighs each one's own mask.
FLEX_CASES = ([Case(s, i) for s in FLEX_MASKS for i in ("none", "packed_padded")]
              + [Case(s, "all", torch.float32) for s in ("flex_prefix_lm", "flex_global_window")]
              + [Case(s, "none", seq_len=96, block_size=4) for s in ("flex_chunked", "flex_block_diffusion")]
              + [Case("flex_dilated", "padding", q_heads=6, kv_heads=1, seq_len=96, block_size=8)])
ALL_CASES = ([Case(s, i) for s in SPECS for i in INFOS] + FLOAT32_CASES + SHAPE_CASES + EXCHANGE_CASES
             + PIECE_CASES + DOCUMENT_CASES + FLEX_CASES)


@pytest.fixture(scope="module")
def references():
    return [reference(c) for c in ALL_CASES]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "balanced"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_matches_dense_reference(cluster, references, world_size, layout):
    _check_against_references(cluster, ALL_CASES, references, world_size, layout)


# A balanced layout that weighs a Gemma-4-like stack (``STACK_MIX``) differs from the causal one at
# 3 ranks on these cases: documents, images, padding, windows and small blocks.
STACK_CASES = [Case(s, "all") for s in SPECS] + EXCHANGE_CASES + DOCUMENT_CASES


@pytest.mark.parametrize("world_size", [2, 3])
def test_stack_balanced_layout_matches_dense_reference(cluster, world_size):
    _check_against_references(cluster, STACK_CASES, [reference(c) for c in STACK_CASES], world_size, "balanced_stack")


def _check_against_references(cluster, cases, references, world_size, layout):
    """Every case's out, dq, dk and dv on ``world_size`` ranks in ``layout`` (``make_layout``), unsharded,
    within the ring's tolerance of its float64 reference."""
    if world_size == 1:
        results = [run_cases(0, 1, cases, layout)]
    else:
        results = cluster(world_size).run(run_cases, cases, layout)
    failures = []
    for index, (case, expected) in enumerate(zip(cases, references)):
        sharding = make_layout(layout, world_size, case)
        for name, part, want in zip(("out", "dq", "dk", "dv"), range(4), expected):
            got = sharding.unshard([results[r][index][part] for r in range(world_size)], dim=2)
            assert got.dtype == case.dtype
            err = (got.to(torch.float64) - want).abs().max().item()
            if not err <= RING[case.dtype]:
                failures.append(f"{case} {name}: max error {err:.3g}")
    assert not failures, "\n".join(failures)


def test_reference_rows_without_keys_are_zero():
    """The padded last document's queries see no key: zero output, zero gradients."""
    case = Case("causal", "packed_padded")
    out, dq, dk, dv = reference(case)
    dead = slice(case.seq_len * 7 // 8, None)
    assert out[-1, :, dead].abs().max() == 0
    assert dq[-1, :, dead].abs().max() == 0
    assert out[-1, :, : case.seq_len // 2].abs().max() > 0


def test_group_may_be_a_device_mesh(cluster):
    assert cluster(2).run(mesh_matches_default_group) == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_one_rank_computes_a_layer_as_one_device(dtype, causal):
    """At P=1 a causal or unmasked layer is one kernel call in the inputs' dtype (an alone call,
    ``exchange.split_alone``): out and every gradient equal ``F.scaled_dot_product_attention``'s
    bit for bit, in bfloat16 too (no float32 round trip, one rounding)."""
    from gemma4_flexring import MaskSpec, ring_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 256, 16, generator=g).to(dtype).requires_grad_(True) for h in (4, 2, 2))
    grad = torch.randn(2, 4, 256, 16, generator=g).to(dtype)
    with planning_sizes(block_size=8, piece_rows=32):  # a causal square of 32 blocks: one call, not cut
        out = ring_attention(q, k, v, mask=MaskSpec(causal=causal))
        ring = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    for name, got, want in zip(("out", "dq", "dk", "dv"), ring, [out, *torch.autograd.grad(out, (q, k, v), grad)]):
        assert torch.equal(got, want), name
