"""transformers ``Trainer`` runs for the trainer tests: ``hf.RingTrainer`` on gloo ranks against a
stock ``Trainer`` in one process, on the same packed rows, from the same seed.

A run trains the tiny Gemma 4 of ``tiny_gemma4`` for a few AdamW steps and returns what the
Trainer logged (loss and grad_norm per step), the final parameters and the evaluation loss. The
one-process run takes the global batch (every CP group's rows) per step; the ring run gives each
CP group its share through the trainer's data loader, so matching numbers also show that the
ranks of a CP group read the same batches and the groups different ones.

Shape legend: rows are [S] token sequences packed with documents (``position_ids`` restart);
a step's global batch is ``dp * batch`` rows (times ``accumulation`` micro-batches).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch

from ..integrations import transformers as hf
from .tiny_gemma4 import CASES, VOCAB, keep_float64, make_model, single_thread

LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class TrainerSetup:
    """One training run.

    Attributes:
        dp, cp: CP groups and ranks per group (a world of ``dp * cp``); ``cp=0`` is the
            one-process stock ``Trainer`` on the global batch.
        dtype: "float64" (transformers' float32 islands kept in float64 on both sides:
            ``keep_float64``) or "float32".
        accumulation: gradient accumulation steps.
        model: "causal" (``Gemma4ForCausalLM``) or "conditional" (``Gemma4ForConditionalGeneration``,
            text-only batches).
        layout: the ring's layout kind.
        iterable: the rows as an ``IterableDataset`` instead of a list.
        seq_len: tokens per row (46: not a multiple of 4, so zigzag over 2 ranks pads).
        batch: rows per CP group and micro-batch.
        steps: optimizer steps.
        parallelism: the ring's CP size given as accelerate's ``ParallelismConfig(cp_size=cp,
            dp_shard_size=dp)`` in the arguments instead of ``cp_size`` (see ``accelerate_cp_on_cpu``).
        trainer: "trainer" (``hf.RingTrainer`` / ``Trainer`` on ``packed_rows``) or "sft" (TRL:
            ``RingSFTTrainer`` / ``SFTTrainer`` with ``padding_free=True`` on ``documents``, each
            micro-batch's documents flattened into one row).
    """

    dp: int = 1
    cp: int = 2
    dtype: str = "float64"
    accumulation: int = 1
    model: str = "causal"
    layout: str = "balanced"
    iterable: bool = False
    seq_len: int = 48
    batch: int = 1
    steps: int = 5
    parallelism: bool = False
    trainer: str = "trainer"

    def one_process(self) -> TrainerSetup:
        """The same training on one process: the global batch per micro-batch."""
        return replace(self, dp=1, cp=0, batch=self.dp * self.batch, parallelism=False)

    @property
    def rows(self) -> int:
        return self.steps * self.accumulation * self.dp * self.batch


@dataclass
class TrainerRun:
    """What a run logged and where it ended.

    Attributes:
        losses, grad_norms: the Trainer's logged values, one per step.
        params: the final parameters by name (float64 copies).
        eval_loss: ``trainer.evaluate()`` on the training rows.
    """

    losses: list[float]
    grad_norms: list[float]
    params: dict[str, torch.Tensor]
    eval_loss: float


def packed_rows(count: int, seq_len: int, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """``count`` rows of random tokens, each packed with 1-3 documents (``position_ids`` restart);
    the labels are the tokens with -100 at each document's first token, as TRL's padding-free
    collator writes them, so that no document learns to predict the next one's start."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = torch.randint(10, VOCAB, (seq_len,), generator=g)
        cuts = sorted(torch.randperm(seq_len - 2, generator=g)[: int(torch.randint(0, 3, (), generator=g))] + 1)
        positions = torch.arange(seq_len)
        for cut in cuts:
            positions[cut:] = torch.arange(seq_len - cut)
        labels = ids.masked_fill(positions == 0, -100)
        rows.append({"input_ids": ids, "position_ids": positions, "labels": labels})
    return rows


class RowStream(torch.utils.data.IterableDataset):
    """``rows`` as an iterable dataset (accelerate dispatches such datasets by default)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def training_arguments(setup: TrainerSetup, output_dir: str, cls: type | None = None, **overrides):
    """The run's ``TrainingArguments`` (or ``cls``, a subclass such as TRL's ``SFTConfig``): AdamW
    at a constant rate, a log per step, nothing saved."""
    from transformers import TrainingArguments

    fields = dict(output_dir=output_dir, max_steps=setup.steps, per_device_train_batch_size=setup.batch,
                  per_device_eval_batch_size=setup.batch, gradient_accumulation_steps=setup.accumulation,
                  learning_rate=LEARNING_RATE, lr_scheduler_type="constant", weight_decay=0.0, optim="adamw_torch",
                  logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                  dataloader_num_workers=0, disable_tqdm=True)
    if setup.cp:
        fields["ddp_backend"] = "gloo"
    if setup.parallelism:
        from accelerate import ParallelismConfig

        fields["parallelism_config"] = ParallelismConfig(cp_size=setup.cp, dp_shard_size=setup.dp)

    return (cls or TrainingArguments)(**{**fields, **overrides})


def trainer_model(setup: TrainerSetup, ring: bool) -> torch.nn.Module:
    """The tiny model in the run's dtype, without a KV cache in training (Gemma 4's
    ``use_cache=True`` would drop transformers' document masks on one process)."""
    case = CASES["vision_padded" if setup.model == "conditional" else "packed"]
    model = make_model(case, ring=False).to(getattr(torch, setup.dtype))
    model.config.get_text_config().use_cache = False
    if setup.dtype == "float64":
        keep_float64(model)
    return hf.use_ring_attention(model) if ring else model


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Stack rows of one length into [B, S] tensors."""
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


@contextmanager
def default_dtype(dtype: torch.dtype):
    """torch's default dtype set to ``dtype`` in the block. The Trainer keeps its running loss in a
    ``torch.tensor(0.0)`` (the default dtype): float32 would round a float64 run's logged losses
    (about 1e-7 apart between one process and CP, where the losses agree to 1e-15)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@contextmanager
def accelerate_cp_on_cpu():
    """accelerate's ``ParallelismConfig`` with CP on CPU ranks, in the block.

    accelerate runs a ``ParallelismConfig`` with ``cp_size > 1`` only with FSDP2, which it enables
    on accelerator devices only (``ParallelismConfig._validate_accelerator`` refuses gloo ranks).
    Without that check it builds the config's mesh on the CPU and wraps the model in DDP; the
    trainer's part (the CP groups from the mesh's "cp" dimension, accelerate's own CP kept off the
    model, the data per CP group, the loss) is the same as under FSDP2, which averages gradients
    over the same dp_shard x cp ranks as DDP does here."""
    from unittest import mock

    from accelerate import ParallelismConfig

    with mock.patch.object(ParallelismConfig, "_validate_accelerator", lambda self, accelerator: None):
        yield


def join_world(rank: int, world_size: int) -> None:
    """Tell accelerate the world this rank is in (its gloo group is already up), as torchrun does,
    and forget the state of an earlier run in this process."""
    from accelerate.state import AcceleratorState

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1")
    AcceleratorState._reset_state(reset_partial_state=True)


def run_trainer(rank: int, world_size: int, setup: TrainerSetup, output_dir: str) -> TrainerRun:
    """Train as ``setup`` says: the ring's trainer on this gloo rank, or (``setup.cp == 0``, called
    in one process) the stock one."""
    ring = setup.cp > 0
    if ring:
        join_world(rank, world_size)
    with accelerate_cp_on_cpu() if setup.parallelism else nullcontext():
        return _train(setup, output_dir, ring)


def _train(setup: TrainerSetup, output_dir: str, ring: bool) -> TrainerRun:
    model = trainer_model(setup, ring)
    if setup.trainer == "sft":
        trainer = _sft_trainer(setup, model, output_dir, ring)
    else:
        from transformers import Trainer

        rows = packed_rows(setup.rows, setup.seq_len)
        common = dict(model=model, args=training_arguments(setup, output_dir), data_collator=collate,
                      train_dataset=RowStream(rows) if setup.iterable else rows, eval_dataset=rows)
        cp_size = None if setup.parallelism else setup.cp  # a ParallelismConfig's CP size is the trainer's
        trainer = hf.RingTrainer(**common, cp_size=cp_size, layout=setup.layout) if ring else Trainer(**common)
    with single_thread(), default_dtype(getattr(torch, setup.dtype)):
        trainer.train()
        eval_loss = trainer.evaluate()["eval_loss"]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "grad_norm" in entry]
    params = {n: p.detach().to(torch.float64).clone() for n, p in trainer.accelerator.unwrap_model(
        trainer.model).named_parameters()}
    return TrainerRun([e["loss"] for e in logs], [e["grad_norm"] for e in logs], params, eval_loss)


def documents(count: int, seed: int = 4) -> list[dict[str, list[int]]]:
    """``count`` tokenized documents of 5 to 28 random tokens (TRL's ``{"input_ids": [...]}``)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 29, (count,), generator=g)
    return [{"input_ids": torch.randint(10, VOCAB, (int(n),), generator=g).tolist()} for n in lengths]


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary ("t0" .. "t127"; pad t0, unk t1, eos t2):
    what TRL asks for, without a download."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                   pad_token="t0", unk_token="t1", eos_token="t2")


def _sft_trainer(setup: TrainerSetup, model: torch.nn.Module, output_dir: str, ring: bool):
    """TRL's ``SFTTrainer`` (one process) or ``RingSFTTrainer`` (this rank), padding-free."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    class RingSFTTrainer(hf.RingTrainerMixin, SFTTrainer):
        """TRL's SFTTrainer with the ring: the mixin's documented use."""

    rows = datasets.Dataset.from_list(documents(setup.rows))
    args = training_arguments(setup, output_dir, SFTConfig, padding_free=True, max_length=None)
    common = dict(model=model, args=args, train_dataset=rows, eval_dataset=rows, processing_class=tiny_tokenizer())
    return RingSFTTrainer(**common, cp_size=setup.cp, layout=setup.layout) if ring else SFTTrainer(**common)


def trainer_refusal(rank: int, world_size: int, setup: TrainerSetup, output_dir: str, what: str) -> None:
    """Build (and for a batch problem, step) a ``hf.RingTrainer`` with one thing it cannot honour:
    "label_smoothing", "compute_loss_func", "compute_metrics", "cp_size" (3 on this world),
    "accelerate_world" (no ``use_cpu=True``: accelerate sees one process on a CPU machine),
    "layout", "images" (a batch with ``pixel_values``), "images_one_data_group" (such batches on
    the last data group only), "predict" (logits asked for)."""
    join_world(rank, world_size)
    rows = packed_rows(setup.rows, setup.seq_len)
    overrides = {"label_smoothing": {"label_smoothing_factor": 0.1},
                 "accelerate_world": {"use_cpu": False, "ddp_backend": None}}.get(what, {})
    kwargs = dict(model=trainer_model(setup, ring=True), args=training_arguments(setup, output_dir, **overrides),
                  train_dataset=rows, data_collator=collate, cp_size=3 if what == "cp_size" else setup.cp,
                  layout="ring" if what == "layout" else setup.layout)
    if what == "compute_loss_func":
        kwargs["compute_loss_func"] = lambda outputs, labels, num_items_in_batch=None: outputs.loss
    if what == "compute_metrics":
        kwargs["compute_metrics"] = lambda prediction: {}
    if what.startswith("images"):
        images = what == "images" or rank >= world_size - setup.cp  # this rank's data group has images
        kwargs["data_collator"] = lambda batch: {**collate(batch), **({"pixel_values": torch.zeros(1, 3, 4, 4)}
                                                                      if images else {})}
    trainer = hf.RingTrainer(**kwargs)
    with single_thread():
        if what == "predict":
            trainer.predict(rows)
        trainer.train()



def parallelism_config_groups(rank: int, world_size: int, dp: int, cp: int, cp_size: int | None) -> tuple:
    """``cp_groups`` for an accelerator whose ``ParallelismConfig(dp_shard_size=dp, cp_size=cp)``
    built its mesh as accelerate does (dimensions "dp_shard", "cp"): the CP group's global ranks,
    this rank's CP rank, data rank and data size. (accelerate enables that config only with FSDP2,
    which it runs on GPU device types only, so a whole trainer cannot be built with it here.)"""
    from types import SimpleNamespace

    import torch.distributed as dist
    from accelerate import ParallelismConfig
    from torch.distributed.device_mesh import init_device_mesh

    from ..integrations.trainer import cp_groups

    mesh = init_device_mesh("cpu", (dp, cp), mesh_dim_names=("dp_shard", "cp"))
    accelerator = SimpleNamespace(parallelism_config=ParallelismConfig(dp_shard_size=dp, cp_size=cp),
                                  torch_device_mesh=mesh)
    groups = cp_groups(cp_size, accelerator, "cpu")
    return dist.get_process_group_ranks(groups.group), groups.rank, groups.data_rank, groups.data_size
