"""``python -m gemma4_flexring demo``: a context-parallel Gemma 4 training step, checked.

Builds a tiny random Gemma 4 (sliding and global layers, image blocks bidirectional on sliding
layers), shards a packed, padded batch with image blocks over N ranks, runs two steps of
``torch.compile(fullgraph=True)`` forward and backward through ``attn_implementation=
"gemma4_flexring"``, and compares logits, loss and every parameter gradient with one process
running the whole sequence through transformers' sdpa attention. Prints a short report (parity,
time, bytes sent, ring steps skipped, compiled frames) and exits 1 on a mismatch. Each phase says
on stderr when it starts.

Ranks (``tools/ranks.py``): spawned gloo processes on this machine (``--world-size``, default 2),
or the ranks of ``torchrun --nproc-per-node N -m gemma4_flexring demo`` (NCCL on GPUs that have a
chunk kernel, gloo on CPU otherwise).

Shape legend: B batch rows, S whole sequence, P ranks, L = S / P local tokens, V vocabulary.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..info import SequenceInfo, blocks_from_token_types
from ..layout import FIXED_LAYOUTS, Layout
from ..planning.masks import MaskSpec
from ..stats import reset_ring_stats, ring_stats
from ..testing.reference import reference_mask
from ..testing.tolerances import TRANSFORMERS_COMPILED, relative_error
from . import ranks

DTYPE = torch.float64
STEPS = 2  # step 1 compiles, step 2 (a new batch) must reuse the compiled frame
ROWS = 2
IMAGE_TOKEN, PAD_TOKEN, VOCAB = 5, 0, 256
MIN_SEQ_LEN = 32
DEMO_LAYOUTS = ("balanced", *FIXED_LAYOUTS)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gemma4_flexring demo", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks to spawn (default 2; under torchrun, its WORLD_SIZE)")
    parser.add_argument("--seq-len", type=int, default=384,
                        help="tokens per row, whole sequence (default 384: splits over 1, 2, 3, 4 ranks either way)")
    parser.add_argument("--layout", choices=DEMO_LAYOUTS, default="balanced",
                        help="sharding (default balanced: built from each packed batch by shard_inputs)")
    parser.add_argument("--backend", default=None,
                        help="torch.compile backend (default: inductor on GPUs; aot_eager on CPU, which traces "
                             "the same forward and backward graphs without inductor's minutes of C++ compiling)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Raise ValueError on arguments no rank could run, before anything is spawned."""
    if world_size < 1:
        raise ValueError(f"--world-size must be positive, got {world_size}")
    if args.seq_len < MIN_SEQ_LEN:
        raise ValueError(f"--seq-len must be at least {MIN_SEQ_LEN} (documents, images and padding), "
                         f"got {args.seq_len}")
    if args.layout == "balanced":
        if args.seq_len % world_size:
            raise ValueError(f"balanced layout over {world_size} ranks needs a sequence length that is a "
                             f"multiple of {world_size}, got {args.seq_len}")
    else:
        Layout(args.layout, world_size).check_length(args.seq_len)


# ----------------------------------------------------------------------------- model and data

def demo_config(seq_len: int):
    """The demo's Gemma 4: the tiny stack of the tests (``testing.tiny_gemma4``; sliding W = S/8,
    images bidirectional) with a vision tower."""
    from ..testing.tiny_gemma4 import tiny_config, tiny_text_config

    text = tiny_text_config(hidden_size=64, head_dim=16, window=seq_len // 8, vocab_size=VOCAB,
                            bidirectional="vision", pad_token_id=PAD_TOKEN)
    return tiny_config(text, image_token_id=IMAGE_TOKEN)


def make_model(config, device: torch.device, ring: bool) -> torch.nn.Module:
    """The demo model, seeded so that every process holds the same weights; float64."""
    from transformers import Gemma4ForConditionalGeneration

    from ..integrations import transformers as hf

    torch.manual_seed(0)
    # A copy: switching the attention implementation writes to the model's config object.
    model = Gemma4ForConditionalGeneration(copy.deepcopy(config)).to(device=device, dtype=DTYPE)
    return hf.use_ring_attention(model) if ring else model


@dataclass(frozen=True)
class Batch:
    """A whole-sequence batch, every tensor [B, S]."""

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    mm_token_type_ids: Tensor
    labels: Tensor

    def as_kwargs(self) -> dict[str, Tensor]:
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, attention_mask=self.attention_mask,
                    mm_token_type_ids=self.mm_token_type_ids, labels=self.labels)

    def describe(self) -> str:
        documents = ROWS + int((torch.diff(self.position_ids, dim=-1) != 1).sum())
        images = int((blocks_from_token_types(self.mm_token_type_ids).amax(-1) + 1).sum())
        padding = int((self.attention_mask == 0).sum())
        return (f"{ROWS} rows x {self.input_ids.shape[1]} tokens: {documents} packed documents, "
                f"{images} image blocks, {padding} padding tokens")


def demo_batch(seq_len: int, step: int, device: torch.device) -> Batch:
    """Packed documents, image blocks longer than the window and right padding, all crossing ranks.

    ``step`` moves the document boundaries, so each step brings new metadata at the same shapes.
    Labels ignore image tokens, padding and each document's first token (no cross-document target).
    """
    s = seq_len
    g = torch.Generator().manual_seed(step)
    input_ids = torch.randint(10, VOCAB, (ROWS, s), generator=g)
    cuts = [[3 * s // 8 + step, 3 * s // 4], [s // 2 - step]]
    position_ids = torch.stack([_restarting_positions(s, row_cuts) for row_cuts in cuts])
    mm_token_type_ids = torch.zeros(ROWS, s, dtype=torch.long)
    mm_token_type_ids[0, s // 8: 3 * s // 8] = 1
    mm_token_type_ids[1, 5 * s // 8: 7 * s // 8] = 1
    attention_mask = torch.ones(ROWS, s, dtype=torch.long)
    attention_mask[1, s - s // 16:] = 0
    input_ids = input_ids.masked_fill(mm_token_type_ids == 1, IMAGE_TOKEN).masked_fill(attention_mask == 0, PAD_TOKEN)
    ignored = (mm_token_type_ids == 1) | (attention_mask == 0) | (position_ids == 0)
    labels = input_ids.masked_fill(ignored, -100)
    tensors = (input_ids, position_ids, attention_mask, mm_token_type_ids, labels)
    return Batch(*(t.to(device) for t in tensors))


def _restarting_positions(seq_len: int, cuts: list[int]) -> Tensor:
    bounds = [0, *cuts, seq_len]
    return torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])])


def reference_masks(config, batch: Batch) -> dict[str, Tensor]:
    """The intended mask of each layer type, bool [B, 1, S, S], straight from the mask formula.

    transformers cannot build this batch's mask itself: it drops packing when an attention mask
    is given, and its packed + vision mask indexes image blocks by in-document position. So the
    one-process run gets these masks, and transformers' sdpa attention does the rest.
    """
    text = config.get_text_config()
    specs = {"full_attention": MaskSpec(causal=True),
             "sliding_attention": MaskSpec(causal=True, sliding_window=text.sliding_window, block_bidirectional=True)}
    info = SequenceInfo.from_hf(batch.attention_mask.cpu(), batch.position_ids.cpu(), batch.mm_token_type_ids.cpu())
    seq_len = batch.input_ids.shape[1]
    return {kind: reference_mask(spec, info, ROWS, seq_len).unsqueeze(1).to(batch.input_ids.device)
            for kind, spec in specs.items()}


# ----------------------------------------------------------------------------- the two runs

@dataclass
class StepResult:
    """Whole-sequence logits [B, S, V], loss, gradients by parameter name."""

    logits: Tensor
    loss: Tensor
    grads: dict[str, Tensor]


def one_process(model: torch.nn.Module, config, batch: Batch) -> StepResult:
    """transformers on the whole sequence: sdpa with the intended masks, its own mean loss."""
    model.zero_grad(set_to_none=True)
    kwargs = batch.as_kwargs()
    kwargs["attention_mask"] = reference_masks(config, batch)
    out = model(**kwargs, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return StepResult(out.logits.detach(), out.loss.detach(), grads)


@dataclass
class Measured:
    """One CP step as every rank saw it (sums and maxima over ranks)."""

    result: StepResult
    seconds: float
    bytes_sent: int
    ring_steps: int
    ring_steps_skipped: int


def cp_step(compiled, model: torch.nn.Module, batch: Batch, layout: Layout | str, rank: int) -> Measured:
    """One compiled forward and backward on this rank's shard, reassembled over the group
    (``layout="balanced"``: ``shard_inputs`` builds it from the batch; a new one every step)."""
    from ..integrations import transformers as hf

    model.zero_grad(set_to_none=True)
    kwargs = hf.shard_inputs(model, **batch.as_kwargs(), layout=layout, rank=rank)
    layout = kwargs[hf.CONTEXT_KWARG].layout
    reset_ring_stats()
    dist.barrier()
    start = time.perf_counter()
    out = compiled(**kwargs)
    out.loss.backward()
    seconds = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    stats = ring_stats()
    ring_counts = torch.tensor([stats.bytes_sent, stats.steps, stats.steps_skipped], dtype=torch.int64)
    device = out.logits.device
    logits = [torch.empty_like(out.logits) for _ in range(layout.world_size)]
    dist.all_gather(logits, out.logits.detach().contiguous())
    loss = _all_reduced(out.loss.detach(), device)
    grads = {n: _all_reduced(p.grad, device) for n, p in model.named_parameters() if p.grad is not None}
    result = StepResult(layout.unshard(logits, dim=1), loss, grads)
    seconds = _all_reduced(seconds, device, dist.ReduceOp.MAX)
    return Measured(result, float(seconds), *(int(c) for c in _all_reduced(ring_counts, device)))


def _all_reduced(t: Tensor, device: torch.device, op=dist.ReduceOp.SUM) -> Tensor:
    """A reduced copy of ``t`` over the default group (NCCL needs it on the rank's device)."""
    t = t.to(device, copy=True)
    dist.all_reduce(t, op=op)
    return t


# ----------------------------------------------------------------------------- parity and report

@dataclass(frozen=True)
class Parity:
    """Relative max errors: logits and loss against their largest magnitude, worst parameter."""

    logits: float
    loss: float
    grads: float
    missing: tuple[str, ...]  # parameters with a gradient in one run only

    @property
    def ok(self) -> bool:
        return not self.missing and max(self.logits, self.loss, self.grads) <= TRANSFORMERS_COMPILED

    def worst(self, other: "Parity") -> "Parity":
        return Parity(max(self.logits, other.logits), max(self.loss, other.loss), max(self.grads, other.grads),
                      self.missing + other.missing)


def parity(cp: StepResult, ref: StepResult) -> Parity:
    """How far the CP step is from the one-process step."""
    grads = [relative_error(cp.grads[n], g) for n, g in ref.grads.items() if n in cp.grads]
    return Parity(relative_error(cp.logits, ref.logits), relative_error(cp.loss, ref.loss), max(grads, default=0.0),
                  tuple(sorted(set(cp.grads) ^ set(ref.grads))))


@dataclass(frozen=True)
class Setup:
    """How the CP steps ran: ranks, layout, device, compile backend, frames dynamo compiled."""

    world_size: int
    layout: str
    device: torch.device
    backend: str
    frames: int


def format_report(setup: Setup, config, batch: Batch, steps: list[Measured], check: Parity) -> str:
    text = config.get_text_config()
    first, *warm = steps
    per_rank = setup.world_size * len(steps)
    lines = [
        f"gemma4-flexring demo: {setup.world_size} ranks ({dist.get_backend()}, {setup.device.type}), "
        f"{setup.layout} layout",
        f"  model:    tiny Gemma 4, {text.num_hidden_layers} layers (sliding W={text.sliding_window} and global), "
        f"use_bidirectional_attention={text.use_bidirectional_attention!r}, {str(DTYPE).removeprefix('torch.')}",
        f"  batch:    {batch.describe()}",
        f"  compiled: torch.compile(fullgraph=True, backend={setup.backend!r}): {setup.frames} frame(s) for "
        f"{len(steps)} steps (new metadata each step; "
        f"{'no recompile' if setup.frames == 1 else f'{setup.frames - 1} recompile(s)'})",
        f"  time:     step 1 (compile, forward, backward) {first.seconds:.1f} s; "
        + "; ".join(f"step {i}: {m.seconds * 1e3:.0f} ms" for i, m in enumerate(warm, start=2)),
        f"  ring:     {sum(m.bytes_sent for m in steps) / per_rank / 1e6:.2f} MB sent per rank and step "
        f"(K/V forward, K/V and dK/dV backward); {sum(m.ring_steps_skipped for m in steps) // per_rank} of "
        f"{sum(m.ring_steps for m in steps) // per_rank} ring steps per rank and step skipped (no visible key)",
        f"  parity:   against one process (sdpa, whole sequence), relative max error: logits {check.logits:.1e}, "
        f"loss {check.loss:.1e}, gradients {check.grads:.1e} (tolerance {TRANSFORMERS_COMPILED:.0e})",
    ]
    if check.missing:
        lines.append(f"  gradients in one run only: {', '.join(check.missing)}")
    lines.append("  OK" if check.ok else "  MISMATCH")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- ranks

def run_rank(rank: int, world_size: int, args: argparse.Namespace, device: torch.device) -> tuple[bool, str]:
    """Every rank: the CP steps; rank 0 also the one-process runs, and the progress lines. Returns
    (ok, rank 0's report)."""
    from torch._dynamo.utils import counters

    config = demo_config(args.seq_len)
    layout = args.layout if args.layout == "balanced" else Layout(args.layout, world_size)
    backend = args.backend or ("inductor" if device.type == "cuda" else "aot_eager")
    if rank == 0:
        log(f"building the tiny Gemma 4 on {world_size} rank(s) ({device.type}) and the one-process reference")
    model = make_model(config, device, ring=True)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    reference = make_model(config, device, ring=False) if rank == 0 else None
    counters.clear()
    measured, check = [], None
    for step in range(STEPS):
        batch = demo_batch(args.seq_len, step, device)
        if rank == 0:
            what = f"compile ({backend!r}), forward and backward" if step == 0 else \
                "forward and backward on new metadata (no recompile allowed)"
            log(f"step {step + 1}/{STEPS}: {what}, {world_size} rank(s), {args.layout} layout")
        with torch.compiler.set_stance("default" if step == 0 else "fail_on_recompile"):
            measured.append(cp_step(compiled, model, batch, layout, rank))
        if reference is not None:
            log(f"step {step + 1}/{STEPS}: one process on the whole sequence (sdpa), for parity")
            step_check = parity(measured[-1].result, one_process(reference, config, batch))
            check = step_check if check is None else check.worst(step_check)
    ok = torch.tensor(int(rank != 0 or check.ok), device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if rank != 0:
        return bool(ok), ""
    setup = Setup(world_size, args.layout, device, backend, counters["stats"]["unique_graphs"])
    return bool(ok), format_report(setup, config, batch, measured, check)


def log(message: str) -> None:
    """A progress line on stderr, at once (stdout carries the report)."""
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torchrun = ranks.torchrun_world_size()
    world_size = torchrun or (2 if args.world_size is None else args.world_size)

    def check_then_announce() -> None:
        if torchrun and args.world_size not in (None, world_size):
            raise ValueError(f"--world-size {args.world_size} but torchrun started {world_size} ranks")
        check_args(args, world_size)
        if not torchrun:
            log(f"spawning {world_size} gloo rank(s) on this machine")

    return ranks.command("demo", run_rank, args, world_size, check_then_announce)
