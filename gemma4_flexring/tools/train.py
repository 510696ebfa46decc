"""``python -m gemma4_flexring train``: train a small Gemma 4 on real text under data x context
parallelism, and check it against one process.

    python -m gemma4_flexring train --cp 2 --steps 20 --check
    torchrun --nproc-per-node 4 -m gemma4_flexring train --dp 2 --cp 2 --corpus ~/texts

Data: byte-level tokens, no tokenizer to download. The documents are the files under ``--corpus
DIR`` (sorted by path, read as bytes) or, by default, the Python standard library's own source
files, text that is on any machine with Python. They are packed into rows of ``--seq-len`` tokens
in that order; a document longer than what is left of a row continues in the next one.
``position_ids`` restart at every document and at every row, so the ring keeps documents apart,
and a document's first token is no target: no document is trained to predict the next one.

Parallelism: ``--dp`` x ``--cp`` ranks; ranks ``g * cp .. g * cp + cp - 1`` form CP group ``g``. At
each step every data-parallel group takes its own ``--batch`` rows (the global batch holds dp x
batch rows), and its ranks shard them (``hf.shard_inputs``, ``--layout``) and run the model through
the ring. Each rank's loss is its summed cross entropy over the *global* batch's target count, so
the losses and the gradients summed over every rank (one all_reduce each) are those of one process
on the global batch, and every rank takes the same AdamW step.

``--check`` trains the same steps on the same rows in one process (transformers' sdpa attention on
whole rows, ``use_cache=False``) and prints, per step, the relative difference of the loss and of
the gradient's norm (AdamW would hide a wrongly scaled gradient in the losses); it exits 1 when a
step differs by more than ``CHECK_RTOL``.

Shape legend: R rows of a step's global batch (dp x batch), S tokens per row, V vocabulary.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ..layout import FIXED_LAYOUTS, Layout
from . import ranks

VOCAB, PAD_TOKEN = 257, 256  # the 256 byte values and a padding id no byte takes
IGNORE_INDEX = -100
# --check's bounds, relative, per step. Float32 runs drift apart through AdamW: on the default run
# (cp 2, 20 steps of 1024 tokens) the losses stayed within 1.8e-5 and the gradient norms within
# 1.5e-4 of one process's; a gradient scaled by a rank count would be off by 0.5 or more.
CHECK_RTOL = {"loss": 1e-4, "grad_norm": 1e-3}
LAYOUTS = ("balanced", *FIXED_LAYOUTS)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gemma4_flexring train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp", type=int, default=1, help="data-parallel groups (default 1)")
    parser.add_argument("--cp", type=int, default=2, help="context-parallel ranks per group (default 2)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per row (default 1024)")
    parser.add_argument("--batch", type=int, default=1, help="rows per data-parallel group and step (default 1)")
    parser.add_argument("--layout", choices=LAYOUTS, default="balanced")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="a folder of text files (default: the Python standard library's source files)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) each decoder layer")
    parser.add_argument("--backend", default="aot_eager", help="the compile backend (default aot_eager)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    parser.add_argument("--check", action="store_true", help="train the same steps in one process and compare")
    parser.add_argument("--json", type=Path, default=None, help="write the run's figures here")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Raise ValueError on arguments no rank could run, before any rank starts."""
    for name in ("dp", "cp", "steps", "seq_len", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.dp * args.cp != world_size:
        raise ValueError(f"--dp {args.dp} x --cp {args.cp} = {args.dp * args.cp} ranks, but the launch has {world_size}")
    if args.layout == "balanced":
        if args.seq_len % args.cp:
            raise ValueError(f"a balanced layout over {args.cp} ranks needs --seq-len a multiple of {args.cp}")
    else:
        Layout(args.layout, args.cp).check_length(args.seq_len)
    if args.compile and args.checkpointing:
        raise ValueError("--compile with --checkpointing is not supported: dynamo refuses a checkpointed Gemma 4 "
                         "decoder layer under fullgraph ('HOP: Unsafe side effect' in its forward)")
    if args.corpus is not None and not args.corpus.is_dir():
        raise ValueError(f"--corpus must be a folder, got {args.corpus}")
    if not any(path.stat().st_size for path in corpus_files(args.corpus)):
        raise ValueError(f"the corpus {args.corpus or 'of the standard library'} holds no bytes")


# ----------------------------------------------------------------------------- data

def corpus_files(corpus: Path | None) -> list[Path]:
    """The documents, sorted by path: every file under ``corpus``, or the standard library's ``*.py``."""
    if corpus is None:
        return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return sorted(p for p in corpus.rglob("*") if p.is_file())


@dataclass(frozen=True)
class Rows:
    """Packed rows: ``input_ids``, ``position_ids`` and ``labels``, each int64 [R, S]."""

    input_ids: Tensor
    position_ids: Tensor
    labels: Tensor

    def __getitem__(self, rows: slice) -> "Rows":
        return Rows(self.input_ids[rows], self.position_ids[rows], self.labels[rows])

    def targets(self) -> int:
        """Next-token targets in these rows (as ``hf.shift_labels`` counts them)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def pack(files: list[Path], rows: int, seq_len: int) -> Rows:
    """The first ``rows`` rows of ``seq_len`` tokens packed from ``files`` (bytes; the corpus
    repeats if it is too short). Positions restart at every document and every row; a document's
    first token (position 0) is no target."""
    need = rows * seq_len
    tokens, positions, read = [], [], 0
    while read < need:
        for path in files:
            raw = path.read_bytes()
            if not raw:
                continue
            data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
            tokens.append(data)
            positions.append(torch.arange(data.numel()))
            read += data.numel()
            if read >= need:
                break
        if not read:
            raise ValueError("the corpus holds no bytes")
    ids = torch.cat(tokens)[:need].view(rows, seq_len)
    starts = torch.cat(positions)[:need].view(rows, seq_len) == 0
    starts[:, 0] = True  # a row's first token starts a document fragment
    run = torch.arange(seq_len).expand(rows, -1)
    first = torch.where(starts, run, 0).cummax(1).values  # each token's fragment start
    position_ids = run - first
    return Rows(ids, position_ids, ids.masked_fill(position_ids == 0, IGNORE_INDEX))


# ----------------------------------------------------------------------------- model

def train_config(seq_len: int):
    """A tiny Gemma 4 text stack (``testing.tiny_gemma4``) over bytes; sliding window S / 8."""
    from ..testing.tiny_gemma4 import tiny_text_config

    return tiny_text_config(hidden_size=64, head_dim=16, window=max(1, seq_len // 8), vocab_size=VOCAB,
                            pad_token_id=PAD_TOKEN)


def make_model(args: argparse.Namespace, device: torch.device, ring: bool) -> torch.nn.Module:
    """The model, seeded so that every process starts from the same weights."""
    from transformers import Gemma4ForCausalLM

    from ..integrations import transformers as hf

    torch.manual_seed(0)
    model = Gemma4ForCausalLM(copy.deepcopy(train_config(args.seq_len)))
    model = model.to(device=device, dtype=getattr(torch, args.dtype)).train()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if ring:
        hf.use_ring_attention(model)
    if ring and args.compile:
        for layer in model.model.layers:
            layer.compile(fullgraph=True, backend=args.backend)
    return model


# ----------------------------------------------------------------------------- steps

@dataclass
class Step:
    loss: float  # the global batch's mean loss
    grad_norm: float  # of the gradient the optimizer steps with (AdamW would hide a wrongly scaled one)
    seconds: float
    tokens: int


def grad_norm(model: torch.nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()
                                                       if p.grad is not None])))


def log(message: str) -> None:
    """A progress line on stderr, at once (stdout carries the report)."""
    print(f"[train] {message}", file=sys.stderr, flush=True)


def progress(step: int, steps: int, record: Step) -> str:
    done = round(20 * step / steps)
    return (f"step {step:>{len(str(steps))}}/{steps} [{'#' * done}{'.' * (20 - done)}] loss {record.loss:.4f}  "
            f"{record.tokens / record.seconds:,.0f} tok/s")


def ring_steps(rank: int, args: argparse.Namespace, device: torch.device, data: Rows) -> list[Step]:
    """Every step of the CP run on this rank; the logged loss is the sum over every rank."""
    from ..integrations import transformers as hf

    model = make_model(args, device, ring=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    mesh = hf.cp_mesh(args.dp, args.cp, device.type)  # each CP group: consecutive ranks
    group, cp_rank, dp_rank = mesh.cp_group, mesh.cp_rank, mesh.dp_rank
    layout = args.layout if args.layout == "balanced" else Layout(args.layout, args.cp)
    rows_per_step, records = args.dp * args.batch, []

    def shard(step: int) -> dict:
        """This rank's kwargs for ``step``, its plans built on a background thread (``plan_ahead``)."""
        global_rows = data[slice(step * rows_per_step, (step + 1) * rows_per_step)]
        mine = global_rows[slice(dp_rank * args.batch, (dp_rank + 1) * args.batch)]
        kwargs = hf.shard_inputs(model, input_ids=mine.input_ids.to(device), position_ids=mine.position_ids.to(device),
                                 labels=mine.labels.to(device), layout=layout, rank=cp_rank, group=group,
                                 plan_ahead=True)
        kwargs["num_items_in_batch"] = torch.tensor(global_rows.targets(), device=device)
        return kwargs

    upcoming = shard(0)
    for step in range(args.steps):
        start = time.perf_counter()
        kwargs = upcoming
        if step + 1 < args.steps:
            upcoming = shard(step + 1)  # planned while this step runs
        loss = model(**kwargs).loss
        loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)  # the ranks' shares SUM to the one-process gradient
        norm = grad_norm(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logged = loss.detach().clone()
        dist.all_reduce(logged)
        records.append(Step(float(logged), norm, time.perf_counter() - start, rows_per_step * args.seq_len))
        if rank == 0:
            log(progress(step + 1, args.steps, records[-1]))
    return records


def one_process_steps(args: argparse.Namespace, device: torch.device, data: Rows) -> list[tuple[float, float]]:
    """The same steps on the same global batches in one process: (loss, gradient norm) per step."""
    model = make_model(args, device, ring=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rows_per_step, losses = args.dp * args.batch, []
    for step in range(args.steps):
        rows = data[slice(step * rows_per_step, (step + 1) * rows_per_step)]
        loss = model(input_ids=rows.input_ids.to(device), position_ids=rows.position_ids.to(device),
                     labels=rows.labels.to(device), use_cache=False).loss
        loss.backward()
        losses.append((float(loss.detach()), grad_norm(model)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def run_rank(rank: int, world_size: int, args: argparse.Namespace, device: torch.device) -> tuple[bool, str]:
    """Every rank trains; rank 0 also runs the check, and reports. Returns (ok, rank 0's report)."""
    from torch._dynamo.utils import counters

    files = corpus_files(args.corpus)
    data = pack(files, args.steps * args.dp * args.batch, args.seq_len)
    if rank == 0:
        log(f"{len(files)} documents packed into {args.steps} steps of {args.dp * args.batch} x {args.seq_len} "
            f"tokens; training on {world_size} rank(s) (dp {args.dp} x cp {args.cp}, {args.layout} layout)")
    counters.clear()
    start = time.perf_counter()
    records = ring_steps(rank, args, device, data)
    elapsed = time.perf_counter() - start
    summary = {"dp": args.dp, "cp": args.cp, "seq_len": args.seq_len, "layout": args.layout, "dtype": args.dtype,
               "steps": [asdict(r) for r in records], "seconds": elapsed,
               "tokens_per_s": sum(r.tokens for r in records) / elapsed,
               "median_step_tokens_per_s": statistics.median(r.tokens / r.seconds for r in records)}
    if args.compile:
        summary["frames_per_layer"] = counters["stats"]["unique_graphs"] / len(train_config(args.seq_len).layer_types)
    ok = True
    if rank == 0 and args.check:
        log(f"--check: the same {args.steps} steps in one process (sdpa, whole rows)")
        reference = one_process_steps(args, device, data)
        differences = {"loss": [abs(r.loss - loss) / abs(loss) for r, (loss, _) in zip(records, reference)],
                       "grad_norm": [abs(r.grad_norm - norm) / norm for r, (_, norm) in zip(records, reference)]}
        summary["check"] = {"one_process_losses": [loss for loss, _ in reference],
                            "one_process_grad_norms": [norm for _, norm in reference],
                            "relative_differences": differences, "rtol": CHECK_RTOL}
        ok = all(max(differences[k]) <= CHECK_RTOL[k] for k in CHECK_RTOL)
    verdict = torch.tensor(int(ok), device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
    if rank != 0:
        return bool(verdict), ""
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    return bool(verdict), report(summary, len(files))


def report(summary: dict, documents: int) -> str:
    steps = summary["steps"]
    lines = [f"gemma4-flexring train: dp {summary['dp']} x cp {summary['cp']}, {summary['layout']} layout, "
             f"{summary['dtype']}, {documents} documents in rows of {summary['seq_len']} byte tokens",
             f"  loss:     {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f} over {len(steps)} steps",
             f"  time:     {summary['seconds']:.1f} s, {summary['tokens_per_s']:,.0f} tokens/s "
             f"({summary['median_step_tokens_per_s']:,.0f} in the median step)"]
    if "frames_per_layer" in summary:
        lines.append(f"  compiled: {summary['frames_per_layer']:.1f} frame(s) per decoder layer over the run")
    if "check" in summary:
        lines.append("  check:    against one process, relative difference per step")
        verdicts = []
        for name, diffs in summary["check"]["relative_differences"].items():
            lines.append(f"    {name + ':':<11}" + " ".join(f"{d:.1e}" for d in diffs))
            within = max(diffs) <= CHECK_RTOL[name]
            verdicts.append(f"{name} {'within' if within else 'PAST'} {CHECK_RTOL[name]:g} (largest {max(diffs):.1e})")
        ok = all(max(d) <= CHECK_RTOL[k] for k, d in summary["check"]["relative_differences"].items())
        lines.append(f"  {'OK' if ok else 'MISMATCH'}: " + ", ".join(verdicts))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    world_size = ranks.torchrun_world_size() or args.dp * args.cp
    return ranks.command("train", run_rank, args, world_size, lambda: check_args(args, world_size))
