"""Inputs, models and per-rank workers of the compile tests (``compile_tests/``).

Workers are module-level functions ``fn(rank, world_size, ...)`` for ``launch.Cluster.run``; they
return plain numbers so that tests assert in the parent process. Batches' metadata is the
catalog's ``cases.training_info``.

Shape legend: B batch rows, S whole sequence, L this rank's tokens, Hq query heads, Hkv key/value
heads, D head dim.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from .. import FlexMask, Layout, MaskSpec, SequenceInfo, clear_mask_cache, mask_cache_info, presets, ring_attention
from ..prepare import mask_arguments
from .cases import training_info
from .model import Gemma4Attention

# Ten lengths, every one a multiple of 4 (zigzag over 2 ranks needs 2 * 2 equal pieces).
LENGTHS = (16, 24, 32, 40, 48, 56, 64, 72, 88, 112)
HIDDEN = 32
BATCH = 2


def make_hidden(seq_len: int, batch: int = BATCH, dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    """Hidden states [B, S, 32], drawn in float64 from the seed and the length."""
    g = torch.Generator().manual_seed(1000 + seed + seq_len)
    return torch.randn(batch, seq_len, HIDDEN, generator=g, dtype=torch.float64).to(dtype)


class Stack(nn.Module):
    """Residual Gemma 4 attention layers: sliding, global, sliding, ... (two distinct masks)."""

    def __init__(self, num_layers: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(
            Gemma4Attention(hidden_size=HIDDEN, sliding_window=None if i % 2 else 8) for i in range(num_layers))
        self.to(dtype)

    def forward(self, hidden: Tensor, position_ids: Tensor | None = None, info: SequenceInfo | None = None,
                layout: Layout | None = None) -> Tensor:
        for layer in self.layers:
            hidden = hidden + layer(hidden, position_ids, info=info, layout=layout)
        return hidden

    def distinct_masks(self) -> int:
        return len({layer.mask for layer in self.layers})


def run_step(model: nn.Module, hidden: Tensor, **kwargs) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Forward and backward of ``model`` (sum of squares loss): (out, d hidden, d parameters)."""
    for p in model.parameters():
        p.grad = None
    hidden = hidden.detach().clone().requires_grad_(True)
    out = model(hidden, **kwargs)
    out.pow(2).sum().backward()
    return out.detach(), hidden.grad, [p.grad.clone() for p in model.parameters()]


def max_error(a: tuple, b: tuple) -> float:
    """Largest difference between two ``run_step`` results, each tensor relative to its largest entry."""
    pairs = [(a[0], b[0]), (a[1], b[1]), *zip(a[2], b[2])]
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in pairs)


def dynamo_graphs() -> int:
    """Graphs dynamo has captured in this process so far (any frame, any backend)."""
    return counters["stats"]["unique_graphs"]


def compile_configs() -> tuple[dict, dict]:
    """Process-global dynamo and inductor settings, to check that nothing leaves them changed."""
    import torch._inductor.config as inductor_config

    return torch._dynamo.config.get_config_copy(), inductor_config.get_config_copy()


def steps_under_compile(model: nn.Module, compiled: nn.Module, lengths, warmup: int, layout_of=None,
                        rank: int = 0, dtype: torch.dtype = torch.float32, vary_packing: bool = False) -> dict:
    """Train-like steps over ``lengths``, a fresh ``SequenceInfo`` each; compiled vs eager.

    ``layout_of(info)`` gives each step's layout; ``vary_packing`` moves a document boundary
    from step to step (so that equal lengths still get other balanced layouts).

    After ``warmup`` steps the stance is ``fail_on_recompile``. Returns the largest compiled/eager
    difference and per-step mask-cache deltas of the compiled step (forward + backward) alone.
    """
    errors, builds, hits, entries, generations, tables = [], [], [], [], [], []
    for step, seq_len in enumerate(lengths):
        info = training_info(seq_len, seed=step if vary_packing else 0)
        hidden = make_hidden(seq_len, dtype=dtype)
        layout = None if layout_of is None else layout_of(info)
        kwargs = {"info": info}
        if layout is not None:
            hidden = layout.shard(hidden, 1, rank)
            positions = layout.positions(seq_len, rank).expand(BATCH, -1)
            kwargs.update(position_ids=positions, layout=layout)
        stance = torch.compiler.set_stance("fail_on_recompile") if step >= warmup else contextlib.nullcontext()
        before = mask_cache_info()
        with stance:
            got = run_step(compiled, hidden, **kwargs)
        after = mask_cache_info()
        builds.append(after.builds - before.builds)
        hits.append(after.hits - before.hits)
        entries.append(after.entries)
        generations.append(after.generation == int(info.generation))
        want = run_step(model, hidden, **kwargs)  # eager, same generation: hits only
        errors.append(max_error(got, want))
        if mask_cache_info().builds != after.builds:
            raise AssertionError("the eager rerun of a step rebuilt masks the compiled step had built")
        tables.append(None if layout is None else layout.table(seq_len).tolist())
    return {"max_error": max(errors), "builds": builds, "hits": hits, "entries": entries,
            "generations_match": all(generations), "distinct_layouts": len({str(t) for t in tables})}


# --- per-rank workers ---------------------------------------------------------------------------


def compiled_ring_steps(rank: int, world_size: int, backend: str, dynamic: bool | None, warmup: int,
                        num_layers: int = 3, lengths=LENGTHS, layout: str = "zigzag") -> dict:
    """A compiled layer stack over the ring, ``lengths`` steps: frames, errors, cache counts.
    ``layout="balanced"``: each step's layout is built from its batch, whose packing changes."""
    clear_mask_cache()
    torch._dynamo.reset()
    model = Stack(num_layers)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=dynamic)
    graphs = dynamo_graphs()
    if layout == "balanced":
        def layout_of(info):
            return Layout.balanced(info, world_size)
    else:
        def layout_of(info):
            return Layout(layout, world_size)
    result = steps_under_compile(model, compiled, lengths, warmup, layout_of, rank,
                                 vary_packing=layout == "balanced")
    result.update(frames=counter.frame_count, graphs=dynamo_graphs() - graphs,
                  distinct_masks=model.distinct_masks(), num_layers=len(model.layers))
    return result


OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# Which metadata tensors a case passes: none, each one alone, all three.
METADATA_VARIANTS = {"none": (), "document_ids": (0,), "block_ids": (1,), "padding": (2,), "all": (0, 1, 2)}


def opcheck_cases(layout: Layout, rank: int, dtype: torch.dtype, seq_len: int = 16):
    """(name, op, args) for both ops on ``rank``'s shard, one per metadata variant (sliding window
    W = 5, images bidirectional when present), and one with a FlexMask (prefix-LM with packed
    documents).

    The backward op's inputs do not require grad: it is only ever called from the forward op's
    autograd formula and has no derivative of its own.
    """
    g = torch.Generator().manual_seed(7)
    full = [torch.randn(BATCH, h, seq_len, 8, generator=g, dtype=torch.float64).to(dtype) for h in (4, 2, 2, 4)]
    q, k, v, grad_out = (layout.shard(t, 2, rank) for t in full)
    metadata = training_info(seq_len).tensors()
    group = "" if layout.world_size == 1 else torch.distributed.group.WORLD.group_name
    variants = [(name, SequenceInfo(*(t if i in present else None for i, t in enumerate(metadata)),
                                    shape=(BATCH, seq_len)), MaskSpec(sliding_window=5, block_bidirectional=1 in present))
                for name, present in METADATA_VARIANTS.items()]
    variants.append(("flexmask", SequenceInfo(document_ids=metadata[0]),
                     FlexMask(presets.prefix_lm, prefix=torch.tensor([3, 6]))))
    cases = []
    for variant, info, mask in variants:
        masks = mask_arguments(mask, q.device)
        options = (layout.table(seq_len), *(masks[f] for f in ("mask_tensors", "causal", "sliding_window",
                                                                 "block_bidirectional")),
                   group, 0.5, "", masks["mask_name"], masks["mask_generation"])
        forward_args = (q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_(),
                        info.generation, *info.tensors(), *options)
        out, lse = torch.ops.gemma4_flexring.ring_attention(q, k, v, info.generation, *info.tensors(), *options)
        backward_args = (grad_out, q, k, v, out, lse, info.generation, *info.tensors(), *options)
        name = f"{dtype}-{variant}"
        cases.append((f"ring_attention-{name}", torch.ops.gemma4_flexring.ring_attention.default, forward_args))
        cases.append((f"ring_attention_backward-{name}", torch.ops.gemma4_flexring.ring_attention_backward.default,
                      backward_args))
    return cases


def opcheck_all(rank: int, world_size: int, dtypes=(torch.float32, torch.float64)) -> list[tuple[str, dict]]:
    """``torch.library.opcheck`` of both ops, every dtype and metadata variant, on this rank."""
    layout = Layout("contiguous" if world_size == 1 else "zigzag", world_size)
    results = []
    for dtype in dtypes:
        for name, op, args in opcheck_cases(layout, rank, dtype):
            results.append((name, torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)))
    return results


def attend(q: Tensor, k: Tensor, v: Tensor, info: SequenceInfo | None = None, layout: Layout | None = None) -> Tensor:
    """Sliding-window ring attention (W = 4), Gemma 4 scale 1.0."""
    return ring_attention(q, k, v, mask=MaskSpec(sliding_window=4), info=info, layout=layout, scale=1.0)


def generations_in_this_process(count: int = 3) -> list[int]:
    """Generations of ``count`` new SequenceInfos (run in a forked child by a test)."""
    return [int(SequenceInfo(shape=(1, 1)).generation) for _ in range(count)]


def attend_example() -> tuple:
    """A ``graph`` command factory: ``attend`` on 16 then 24 tokens with packed documents."""
    def batch(seq_len: int) -> tuple[tuple, dict]:
        q, k, v = (torch.randn(1, h, seq_len, 8) for h in (4, 2, 2))
        return (q, k, v), {"info": SequenceInfo(document_ids=(torch.arange(seq_len) // 5).view(1, -1))}

    return attend, [batch(16), batch(24)]
