"""Chunk kernels: attention of query rows against the visiting key/value chunk, returning the LSE.

The contract (``ChunkKernel``): a kernel takes the plan of one (query rank, key rank) pair,
which holds its work in two forms (``planning.plan.PairPlan``: dense tiles, additive masks over
partial blocks only; and flex calls, ``planning.flex_calls.SegmentPair``, a ``BlockMask`` per run
of key blocks some query sees), and hands the ring and the exchange its own view of it
(``view``: a ``CallPlan`` of its calls and the key rows they read): the aten kernel calls per
dense tile and reads exact rows, the flex kernel calls once per segment pair and reads whole key
blocks. The ring slices q and the visiting chunk
by each call's ``q_rows`` / ``kv_rows`` and merges the results through their natural-log LSE;
the backward is fed the *merged* out and LSE. The ring never calls a kernel for a skipped block
or pair.

Kernels are chosen by name, "" meaning the device's default (``default_kernel``): flex on CUDA,
aten on CPU. A plain registry, not ``torch.library``'s ``register_kernel`` by device type: the
op's body (planning, the exchange, the merge) is the same on every device, the kernel is a
piece inside it, and the choice is not by device alone: "flex" also runs on CPU (eagerly, for
tests), so one device type has two kernels.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ..planning.plan import CallPlan, PairPlan
from .aten import AtenKernel
from .flex import FlexKernel


class ChunkKernel(Protocol):
    name: str
    devices: tuple[str, ...]  # device types it serves
    # Whether its calls read whole key blocks (flex: the segment pairs' BlockMasks) rather than the
    # tiles' exact rows: the owner then sends those blocks' rows, and a step's calls are not cut
    # into pieces (``needed_kv_rows(..., whole_blocks)``, ``exchange.cut_pieces``).
    reads_whole_blocks: bool

    def view(self, plan: PairPlan) -> CallPlan:
        """This kernel's calls for one pair, objects with ``q_rows`` and ``kv_rows`` slices
        (``Tile``s for aten, ``SegmentPair``s for flex) each handed back to forward/backward, and
        the key rows they read."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, call, scale: float) -> tuple[Tensor, Tensor]:
        """q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (the call's rows) -> (out [B, Hq, Sq, D] in q's dtype,
        lse [B, Hq, Sq] natural log, float32 or float64, -inf for rows with no allowed key); out
        may be wider than q's dtype (the ring accumulates in float32 or float64)."""

    def backward_operands(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """``tensors`` as ``backward`` computes with them (a dtype conversion, or the tensors
        themselves): the ring prepares a row group's grad_out, q and out once for its calls, and
        a piece's K/V rows once for its calls (a step's K/V converted whole would hold a copy of
        up to a chunk; a piece is at most ``exchange.piece_rows``)."""

    def backward(self, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 call, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """This call's share of (dq, dk, dv), given the *merged* out and natural lse of the full row
        (+inf for rows with no key anywhere; float32, float64 for float64 inputs). grad_out, q, k,
        v and out come as ``backward_operands`` prepared them, or as the inputs themselves for a
        call whose shares are the results (``exchange.Piece.alone``). The shares may be wider than
        the inputs."""


KERNELS: dict[str, ChunkKernel] = {"aten": AtenKernel(), "flex": FlexKernel()}


def default_kernel(device: torch.device) -> str:
    """The kernel "" picks: flex on CUDA, aten elsewhere."""
    return "flex" if device.type == "cuda" else "aten"


def kernel_problem(name: str, device: torch.device) -> str | None:
    """Why ``name`` cannot run on ``device`` (None when it can)."""
    resolved = name or default_kernel(device)
    kernel = KERNELS.get(resolved)
    if kernel is None:
        return f"unknown kernel {name!r}; choose one of {tuple(KERNELS)} or None (by device)"
    if device.type not in kernel.devices:
        serving = [n for n, k in KERNELS.items() if device.type in k.devices]
        return (f"kernel {resolved!r} cannot run on device type {device.type!r} (it serves {kernel.devices}); "
                f"kernels for {device.type!r}: {tuple(serving)}")
    return None


def kernel_for(device: torch.device, name: str = "") -> ChunkKernel | None:
    """The kernel ``name`` ("" = the device's default) for ``device``, or None when it cannot serve it."""
    return None if kernel_problem(name, device) else KERNELS[name or default_kernel(device)]

