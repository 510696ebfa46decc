"""Data × context parallelism in your own loop, with FSDP2 or DDP (``gemma4_flexring.hf`` re-exports it).

The world is a 2-D mesh ``("dp", "cp")``: each row is one CP group (consecutive ranks) that runs
one batch through the ring; the rows are data parallel, each with its own batch. FSDP2 shards
the parameters over the whole flattened mesh, as torchtitan and accelerate do::

    mesh = hf.cp_mesh(dp=2, cp=2)                         # after dist.init_process_group
    model = hf.fully_shard_model(hf.use_ring_attention(model), mesh)
    kwargs = hf.shard_inputs(model, **batch, layout="balanced", rank=mesh.cp_rank, group=mesh.cp_group)
    out = model(**hf.scale_loss_to_global_batch(kwargs, mesh))
    out.loss.backward()    # p.grad: this rank's shard of the one-process gradient on the global batch

Why the gradients come out as one process's on the global batch (both halves are needed):

- Each rank's loss is its summed cross entropy over the *global* target count (the CP group's
  count from ``shard_inputs``, summed over the dp group by ``scale_loss_to_global_batch``), so the
  world's losses add up to the one-process mean loss.
- FSDP2 reduces gradients over every rank it shards across, and by default divides by their
  number (dp × cp); ``fully_shard_model`` sets the divide factor to 1, a plain sum.

DDP instead of FSDP2 (every rank keeps whole parameters): ``model = hf.replicate_model(model, mesh)``
in place of ``fully_shard_model``; it all-reduces gradients over the world as a SUM (DDP's own
hook averages), and ``p.grad`` is then the whole one-process gradient on every rank.

FSDP2 already reduces: an ``all_reduce`` of the gradients on top of it (the CP-only recipe's
last step) would add each rank's reduced shard to the other ranks' unrelated shards.

Shape legend: ``batch`` is one CP group's [B, S] whole-sequence batch (``shard_inputs``' input);
each rank's model sees [B, L], L = S / cp; a parameter's gradient is a DTensor sharded over all
dp × cp ranks (``p.grad.full_tensor()`` gathers it, on every rank).
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class CPMesh:
    """The meshes and groups of data × context parallelism (see ``cp_mesh``).

    Attributes:
        mesh: the 2-D mesh, shape [dp, cp], dimensions named ("dp", "cp"); rank r sits at
            (r // cp, r % cp).
        shard_mesh: ``mesh`` flattened to 1-D ("dp_cp", every rank): what FSDP2 shards over.
    """

    mesh: DeviceMesh
    shard_mesh: DeviceMesh

    @property
    def cp_group(self) -> dist.ProcessGroup:
        """This rank's CP group (the ``group`` of ``shard_inputs``)."""
        return self.mesh.get_group("cp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """The ranks at this rank's CP position in every CP group."""
        return self.mesh.get_group("dp")

    @property
    def cp_rank(self) -> int:
        """This rank's rank in its CP group (the ``rank`` of ``shard_inputs``)."""
        return self.mesh.get_local_rank("cp")

    @property
    def dp_rank(self) -> int:
        """Which CP group (which data-parallel batch) this rank belongs to."""
        return self.mesh.get_local_rank("dp")


def cp_mesh(dp: int, cp: int, device_type: str = "cpu") -> CPMesh:
    """The ("dp", "cp") mesh over all ``dp * cp`` ranks; every rank calls it.

    Args:
        dp: data-parallel size (CP groups, each with its own batch).
        cp: context-parallel size (ranks sharing one batch's sequence).
        device_type: "cpu" (gloo) or "cuda" (NCCL), as for ``init_device_mesh``.

    Raises:
        ValueError: a size that is not a positive int, or ``dp * cp`` not the world size; before
            any collective.
        RuntimeError: torch.distributed is not initialized.
    """
    for name, size in (("dp", dp), ("cp", cp)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"cp_mesh: {name} must be a positive int, got {size!r}")
    if not dist.is_initialized():
        raise RuntimeError("cp_mesh: torch.distributed is not initialized; call dist.init_process_group first")
    world_size = dist.get_world_size()
    if dp * cp != world_size:
        raise ValueError(f"cp_mesh: dp * cp = {dp} * {cp} = {dp * cp} ranks, but the world has {world_size}")
    mesh = init_device_mesh(device_type, (dp, cp), mesh_dim_names=("dp", "cp"))
    return CPMesh(mesh, mesh._flatten("dp_cp"))  # private, as torchtitan and accelerate call it (2.11, 2.13)


def fully_shard_model(model: torch.nn.Module, mesh: CPMesh, *, checkpointing: bool = False,
                      compile: bool | str = False, **fsdp_kwargs) -> torch.nn.Module:
    """Shard a transformers model with FSDP2 over the flattened dp × cp mesh, in place; returns it.

    Each decoder layer (every transformers ``GradientCheckpointingLayer``: the text decoder's
    layers, and a multimodal model's encoder layers) becomes an FSDP unit, then the root holds the
    rest (embeddings, final norm, head). Every unit reduces gradients as a SUM over the mesh
    (``set_gradient_divide_factor(1.0)``): with ``scale_loss_to_global_batch`` each rank's loss
    already carries its share of the global mean.

    Args:
        checkpointing: activation checkpointing per decoder layer: each layer keeps only its
            inputs, and its ``forward`` runs again in the backward (non-reentrant
            ``torch.utils.checkpoint``). The FSDP2 hooks stay outside the checkpoint: the
            recompute runs on the parameters FSDP2 gathered for the layer's backward.
        compile: ``torch.compile(fullgraph=True)`` of each decoder layer's ``forward``; a string
            names the backend (True: inductor). The FSDP2 hooks run outside the compiled region,
            the checkpoint (if any) around it: transformers' Gemma 4 layers write the shared-KV
            dict, a side effect that a checkpoint inside a compiled region refuses.
        fsdp_kwargs: passed to every ``fully_shard`` call (``reshard_after_forward``,
            ``mp_policy``, ...); ``mesh`` is ours.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        if compile:
            layer.forward = torch.compile(layer.forward, fullgraph=True,
                                          **({"backend": compile} if isinstance(compile, str) else {}))
        if checkpointing:
            layer.forward = _checkpointed(layer.forward)
        fully_shard(layer, mesh=mesh.shard_mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh.shard_mesh, **fsdp_kwargs)
    for unit in (*layers, model):
        unit.set_gradient_divide_factor(1.0)
    return model


def replicate_model(model: torch.nn.Module, mesh: CPMesh, **ddp_kwargs) -> DistributedDataParallel:
    """``model`` under DDP over every rank of the dp × cp mesh, gradients reduced as a SUM.

    DDP's default hook averages over the world; with ``scale_loss_to_global_batch`` each rank's
    loss already is its share of the global mean, so the sum is one process's gradient.

    Args:
        ddp_kwargs: passed to ``DistributedDataParallel`` (``find_unused_parameters``, ...);
            ``process_group`` is ours (the world, the mesh's ranks).

    Returns:
        The DDP module; call it as the model (``ddp.module`` is ``model``).
    """
    group = mesh.shard_mesh.get_group()
    ddp = DistributedDataParallel(model, process_group=group, **ddp_kwargs)
    ddp.register_comm_hook(group, _sum_gradients)
    return ddp


def _sum_gradients(group, bucket):
    """DDP comm hook: all_reduce a gradient bucket (``dist.GradBucket``) over ``group`` as a SUM
    (DDP's default divides); returns the future of the reduced buffer. No annotations: DDP checks
    them against its types, and this module's are strings (``from __future__ import annotations``)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _checkpointed(forward: Callable) -> Callable:
    """``forward`` under non-reentrant activation checkpointing.

    The recompute gets a copy of each dict argument as the forward found it. transformers' Gemma 4
    layers write their K/V into one dict that the whole stack shares (``shared_kv_states``); by the
    backward it holds every layer's entries. A compiled forward is guarded on the dict's length,
    so a recompute on the live dict compiles a graph of its own (the tiny test model: 6 frames
    for 4 layers instead of 4, toward dynamo's limit of 8 per function), and writes into the live
    dict a second time.
    """

    @functools.wraps(forward)
    def run(*args, **kwargs):
        found = {key: copy.copy(value) for key, value in kwargs.items() if isinstance(value, Mapping)}
        calls = itertools.count()

        def body(*args):
            if next(calls):  # the recompute
                return forward(*args, **{**kwargs, **{key: copy.copy(value) for key, value in found.items()}})
            return forward(*args, **kwargs)

        return checkpoint(body, *args, use_reentrant=False)

    return run


def scale_loss_to_global_batch(kwargs: dict, mesh: CPMesh) -> dict:
    """``shard_inputs``' kwargs with ``num_items_in_batch`` the target count of the global batch.

    ``shard_inputs`` counts its CP group's batch; summed over the dp group (one all_reduce of a
    scalar), each rank's loss becomes its summed cross entropy over the global count, and the
    losses of all dp × cp ranks add up to the one-process mean loss on the global batch.

    Shapes: ``num_items_in_batch`` is a 0-dim int64 tensor, before and after.

    Raises:
        ValueError: ``kwargs`` has no ``num_items_in_batch`` (``shard_inputs`` got no labels).
    """
    if "num_items_in_batch" not in kwargs:
        raise ValueError("scale_loss_to_global_batch: no 'num_items_in_batch' in kwargs; "
                         "pass labels to shard_inputs")
    count = kwargs["num_items_in_batch"].clone()
    dist.all_reduce(count, group=mesh.dp_group)
    return {**kwargs, "num_items_in_batch": count}
