"""transformers' ``Trainer`` under context parallelism: ``RingTrainerMixin`` (``hf.RingTrainer`` is
``RingTrainerMixin`` + ``Trainer``, built by ``ring_trainer_class``).

Launched with ``torchrun`` on ``dp * cp`` ranks::

    trainer = hf.RingTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                             data_collator=collator, cp_size=2, layout="balanced")
    trainer.train()

    class RingSFTTrainer(hf.RingTrainerMixin, SFTTrainer):   # any trainer built on Trainer
        pass

What the mixin changes, each for the numbers of one process on the same global batch:

- Data: the ranks of one CP group receive the same batches, the CP groups different ones
  (``_cp_data_loader``: accelerate's sharding over the CP groups instead of the ranks, and no
  dispatching, which would split a batch over the ranks of one group).
- Sharding: ``compute_loss`` (training, evaluation and prediction loss) shards each
  whole-sequence batch with ``shard_inputs``: packed rows (``position_ids`` restarts) stay apart,
  keys that describe the whole row (``ROW_KEYS``) are dropped, and a row length the layout cannot
  split is padded (padding tokens, no targets).
- Planning ahead: each training batch is sharded when it is fetched, one batch ahead of the step
  that runs it (``Lookahead``), and its plans are built on a background thread (``shard_inputs(...,
  plan_ahead=True)``) while the current step runs.
- Loss: ``num_items_in_batch`` is the global batch's target count (its accumulation steps, every
  CP group), taken on the whole sequences; each rank's loss is its summed cross entropy over it.
  transformers then multiplies each rank's loss by the world size and DDP / FSDP average over the
  world, which leaves the sum over ranks: one process's gradient. The model's own
  ``accepts_loss_kwargs`` is overruled (``Gemma4ForConditionalGeneration`` sets it False, which
  would leave the CP gradients 1/cp too small).
- ``args.parallelism_config`` (accelerate's ``ParallelismConfig(cp_size=...)``): its mesh's "cp"
  dimension is the CP group, and accelerate's own CP (torch's ``context_parallel``, which refuses
  sliding layers and masks) is not applied: the ring replaces it.

What it cannot honour raises in ``__init__``, before the first step: label smoothing, a custom
``compute_loss_func``, ``compute_metrics`` or ``preprocess_logits_for_metrics`` (they need
whole-sequence logits), ``average_tokens_across_devices=False``, a world size that ``cp_size``
does not divide, an accelerate that sees fewer processes than torch.distributed (on CPUs without
``use_cpu=True`` it trains each rank alone, gradients never reduced). A batch with keys it cannot shard (``pixel_values``: image batches) raises before
its forward, on every rank of the CP group.

Shape legend: a batch holds whole-sequence rows [B, S]; each rank's model sees [B, L], L = S / cp
(S padded up to a length the layout splits).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..layout import Layout
from ..validate import agree
from .attention import use_ring_attention
from .data_parallel import cp_mesh
from .inputs import IGNORE_INDEX, shard_inputs, shift_labels

# Keys of a batch that hold whole-sequence [B, S] tensors, sharded by ``shard_inputs``.
SEQUENCE_KEYS = ("input_ids", "position_ids", "attention_mask", "mm_token_type_ids", "labels")
# Keys that describe the whole row (TRL's padding-free collator): meaningless on a shard, dropped.
ROW_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
LAYOUT_KINDS = ("balanced", "zigzag", "contiguous")
# Where a training batch carries its model kwargs, sharded (and planned) when it was fetched.
SHARDED_KEY = "_gemma4_flexring_sharded"


@dataclass(frozen=True)
class CPGroups:
    """Where this rank sits: its CP group, and which of the data-parallel batch streams it reads.

    Attributes:
        group: this rank's CP group (None in a world of one without torch.distributed).
        size: ranks per CP group (``cp_size``).
        rank: this rank's rank in its CP group.
        data_rank: which CP group this is (0 .. data_size - 1): the batch stream it reads.
        data_size: how many CP groups (data-parallel degree).
    """

    group: dist.ProcessGroup | None
    size: int
    rank: int
    data_rank: int
    data_size: int


def cp_groups(cp_size: int | None, accelerator, device_type: str) -> CPGroups:
    """The CP groups of a trainer: the "cp" dimension of accelerate's mesh when its
    ``ParallelismConfig`` enables CP, else ``cp_mesh(world // cp_size, cp_size)``.

    Raises:
        ValueError: ``cp_size`` not a positive int, not dividing the world size, or not the
            ``ParallelismConfig``'s; a CP group whose ranks are not consecutive.
    """
    pc = getattr(accelerator, "parallelism_config", None)
    pc_size = pc.cp_size if pc is not None and pc.cp_enabled else None
    if cp_size is None:
        cp_size = pc_size or 1
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"RingTrainer: cp_size must be a positive int, got {cp_size!r}")
    if pc_size is not None and pc_size != cp_size:
        raise ValueError(f"RingTrainer: cp_size={cp_size} but args.parallelism_config.cp_size={pc_size}; "
                         "give one of them (or the same size)")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % cp_size:
        raise ValueError(f"RingTrainer: cp_size={cp_size} does not divide the world size {world}; "
                         "launch dp * cp ranks (torchrun --nproc-per-node ...)")
    if not dist.is_initialized():
        return CPGroups(None, 1, 0, 0, 1)
    if pc_size is not None:
        mesh = accelerator.torch_device_mesh["cp"]
        group, rank = mesh.get_group(), mesh.get_local_rank()
    else:
        mesh = cp_mesh(world // cp_size, cp_size, device_type)
        group, rank = mesh.cp_group, mesh.cp_rank
    ranks = dist.get_process_group_ranks(group)
    if ranks != list(range(ranks[0], ranks[0] + cp_size)) or ranks[0] % cp_size:
        raise ValueError(f"RingTrainer: the CP group's ranks {ranks} are not {cp_size} consecutive ranks; "
                         "put the 'cp' dimension innermost in the device mesh")
    return CPGroups(group, cp_size, rank, dist.get_rank() // cp_size, world // cp_size)


def pad_rows(batch: dict, multiple: int, pad_token_id: int) -> dict:
    """``batch`` with its whole-sequence tensors padded at the end of each row to a multiple of
    ``multiple`` tokens: ``pad_token_id`` tokens, ``attention_mask`` 0 (made if absent), labels
    ``IGNORE_INDEX``, ``position_ids`` a document of their own (0, 1, ...), ``mm_token_type_ids`` 0.
    Padding is neither attended to nor trained on, so the loss and gradients are unchanged.

    Shapes: [B, S] (position_ids [1, S] too) -> [B, S'], S' = S rounded up to ``multiple``.
    """
    rows, seq_len = batch["input_ids"].shape
    extra = -seq_len % multiple
    if not extra:
        return batch
    padded = dict(batch)
    if padded.get("attention_mask") is None:
        padded["attention_mask"] = torch.ones_like(batch["input_ids"])
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}
    for key, value in fill.items():
        if padded.get(key) is not None:
            padded[key] = torch.nn.functional.pad(padded[key], (0, extra), value=value)
    if batch.get("position_ids") is not None:
        positions = batch["position_ids"]
        tail = torch.arange(extra, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], extra)
        padded["position_ids"] = torch.cat([positions, tail], dim=1)
    return padded


def _cp_data_loader(accelerator, cp: CPGroups, data_loader, device_placement=None, slice_fn_for_dispatch=None):
    """``Accelerator.prepare_data_loader`` (the same arguments), sharded over the CP groups: the
    ranks of one CP group read the same batches. Batches are never dispatched (split from one
    rank's batch), so an ``IterableDataset`` is read by every rank and sharded the same way."""
    from accelerate.data_loader import prepare_data_loader

    if getattr(data_loader, "_is_accelerate_prepared", False):
        if data_loader not in accelerator._dataloaders:
            accelerator._dataloaders.append(data_loader)
        return data_loader
    prepared = prepare_data_loader(
        data_loader, accelerator.device, num_processes=cp.data_size, process_index=cp.data_rank,
        split_batches=accelerator.split_batches,
        put_on_device=accelerator.device_placement if device_placement is None else device_placement,
        rng_types=accelerator.rng_types.copy(), dispatch_batches=False, even_batches=accelerator.even_batches,
        use_seedable_sampler=accelerator.use_seedable_sampler, data_seed=accelerator.dataloader_config.data_seed,
        non_blocking=accelerator.non_blocking, use_stateful_dataloader=accelerator.use_stateful_dataloader)
    accelerator._dataloaders.append(prepared)
    return prepared


class Lookahead:
    """An iterator over ``source``'s batches that fetches one batch ahead and hands every batch it
    fetches to ``prepare`` at once, so that the batch after the one being trained on is prepared
    (sharded, its plans building in the background) while the current step runs.

    Every rank of a CP group draws the same batches at the same points (``prepare`` agrees within
    the group), and the order of the batches is unchanged.
    """

    def __init__(self, source, prepare) -> None:
        self.source, self._prepare = source, prepare
        self._next = self._fetch()

    def _fetch(self):
        batch = next(self.source, None)
        return None if batch is None else self._prepare(batch)

    def __iter__(self):
        return self

    def __next__(self):
        batch, self._next = self._next, None
        if batch is None:
            raise StopIteration
        self._next = self._fetch()
        return batch


class RingTrainerMixin:
    """Context parallelism through the ring for ``transformers.Trainer`` and trainers built on it;
    put it first among the bases (see the module docstring).

    Args:
        cp_size: ranks per CP group; the world's other factor is data parallel. Default: the
            ``ParallelismConfig``'s ``cp_size`` if ``args`` has one, else 1.
        layout: "balanced" (``Layout.balanced`` per batch, from its packing), "zigzag" or
            "contiguous".
        *args, **kwargs: the trainer's own.

    Attributes:
        cp: this rank's ``CPGroups``.
    """

    def __init__(self, *args, cp_size: int | None = None, layout: str = "balanced", **kwargs):
        super().__init__(*args, **kwargs)
        self._refuse_what_cp_cannot_honour(layout)
        self.cp = cp_groups(cp_size, self.accelerator, self.args.device.type)
        self.ring_layout = layout if layout == "balanced" else Layout(layout, self.cp.size)
        # The layout's granularity: rows are padded to a multiple of it.
        self._row_multiple = self.cp.size * (1 if layout == "balanced" else self.ring_layout.pieces_per_rank)
        use_ring_attention(self.accelerator.unwrap_model(self.model))
        self.model_accepts_loss_kwargs = True
        self.accelerator.prepare_data_loader = functools.partial(_cp_data_loader, self.accelerator, self.cp)
        self._lookahead: Lookahead | None = None
        if getattr(self.accelerator, "parallelism_config", None) is not None:
            self.accelerator._prepare_cp = lambda *prepared: prepared  # the ring replaces torch's CP

    def _refuse_what_cp_cannot_honour(self, layout: str) -> None:
        problems = []
        if layout not in LAYOUT_KINDS:
            problems.append(f"layout must be one of {LAYOUT_KINDS}, got {layout!r}")
        if self.args.label_smoothing_factor:
            problems.append(f"label smoothing (label_smoothing_factor={self.args.label_smoothing_factor}) is not "
                            "supported: its loss needs whole-row logits")
        if self.compute_loss_func is not None:
            problems.append("a custom compute_loss_func is not supported: each rank holds a shard of the logits, "
                            "in layout order")
        if self.compute_metrics is not None or self.preprocess_logits_for_metrics is not None:
            problems.append("compute_metrics / preprocess_logits_for_metrics are not supported: each rank holds a "
                            "shard of the logits, in layout order; evaluation reports the loss")
        world = dist.get_world_size() if dist.is_initialized() else 1
        if self.accelerator.num_processes != world:
            problems.append(f"accelerate runs {self.accelerator.num_processes} process(es) but torch.distributed has "
                            f"{world}: gradients would not be reduced over the ranks (on CPUs accelerate needs "
                            "TrainingArguments(use_cpu=True) to see a torchrun world)")
        if not self.args.average_tokens_across_devices:
            problems.append("average_tokens_across_devices=False is not supported: the loss is normalized by the "
                            "global batch's target count")
        if problems:
            raise ValueError("RingTrainer: " + "; ".join(problems))

    def _prepare_context_parallel_inputs(self, model, inputs):
        """No torch context parallelism: ``compute_loss`` shards the batch for the ring."""
        return contextlib.nullcontext, inputs

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Tensor | None:
        """The global batch's target count: every accumulation step's whole-sequence batches,
        shifted as ``shard_inputs`` shifts them, summed over the CP groups (0-dim int64)."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        count = sum((shift_labels(b["labels"], b.get("attention_mask")) != IGNORE_INDEX).sum() for b in batch_samples)
        count = torch.as_tensor(count, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(count)
            count = count // self.cp.size  # every rank of a CP group counted the same batches
        return count

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's micro-batches of one optimizer step, drawn one batch ahead (``Lookahead``):
        each is sharded and its planning started when it is drawn."""
        if self._lookahead is None or self._lookahead.source is not epoch_iterator:
            self._lookahead = Lookahead(epoch_iterator, self._sharded_ahead)
        return super().get_batch_samples(self._lookahead, num_batches, device)

    def _sharded_ahead(self, batch: dict) -> dict:
        """``batch`` carrying its model kwargs (``SHARDED_KEY``), its plans building in the background."""
        return {**batch, SHARDED_KEY: self.shard_batch(batch, plan_ahead=True)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The trainer's loss on this rank's shard of ``inputs``, normalized by the global target
        count. A caller that passes no count (TRL's ``prediction_step``) gets the batch's: without
        it each rank's loss would be the mean over its own shard, and their average not the
        batch's mean."""
        if num_items_in_batch is None:
            num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)
        sharded = inputs[SHARDED_KEY] if SHARDED_KEY in inputs else self.shard_batch(inputs)
        return super().compute_loss(model, sharded, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def shard_batch(self, inputs: dict, plan_ahead: bool = False) -> dict:
        """This rank's model kwargs for a whole-sequence batch (``shard_inputs``, planning on a
        background thread with ``plan_ahead``), rows padded to a length the layout splits,
        ``ROW_KEYS`` dropped, other non-tensor entries kept.

        Raises:
            ValueError: on every rank of the world, when some rank's batch holds a tensor under a key
                that cannot be sharded (``pixel_values``: images).
        """
        inputs = {k: v for k, v in inputs.items() if k != SHARDED_KEY}
        unknown = [k for k, v in inputs.items() if isinstance(v, Tensor) and k not in (*SEQUENCE_KEYS, *ROW_KEYS)]
        problems = [(ValueError, f"cannot shard the batch's {unknown}; it shards the whole-sequence keys "
                                 f"{SEQUENCE_KEYS} (image batches: shard their features with hf.shard_token_features "
                                 "in a loop of your own)")] if unknown else []
        # Every rank agrees, data groups included: a batch one data group cannot shard would
        # otherwise leave the others waiting in the gradients' reduction.
        agree(problems, dist.group.WORLD if dist.is_initialized() else None, lambda: [0], ("failed",), "RingTrainer")
        model = self.accelerator.unwrap_model(self.model)
        text = model.config.get_text_config()
        batch = pad_rows({k: inputs.get(k) for k in SEQUENCE_KEYS}, self._row_multiple, text.pad_token_id or 0)
        kwargs = shard_inputs(model, **batch, layout=self.ring_layout, rank=self.cp.rank, group=self.cp.group,
                              plan_ahead=plan_ahead)
        kwargs.pop("num_items_in_batch", None)  # the trainer passes the global batch's
        rest = {k: v for k, v in inputs.items() if k not in (*SEQUENCE_KEYS, *ROW_KEYS)}
        return {**rest, **kwargs}

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The evaluation loss of a batch; logits are not gathered (each rank holds a shard).

        Raises:
            ValueError: predictions asked for (``predict`` without ``prediction_loss_only=True``).
        """
        if not prediction_loss_only:
            raise ValueError("RingTrainer: predictions (logits) are not gathered under context parallelism, only "
                             "the loss; pass TrainingArguments(prediction_loss_only=True)")
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)


@functools.cache
def ring_trainer_class() -> type:
    """``RingTrainerMixin`` + ``transformers.Trainer`` (built on first use: importing the Trainer
    takes seconds)."""
    from transformers import Trainer

    return type("RingTrainer", (RingTrainerMixin, Trainer), {
        "__module__": "gemma4_flexring.hf", "__qualname__": "RingTrainer",
        "__doc__": "``transformers.Trainer`` with context parallelism through the ring (``RingTrainerMixin``)."})
