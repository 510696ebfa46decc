"""Planning a batch before its step: ``plan_ahead``.

A batch with new metadata costs its pair plans and exchange schedules (one set per kind of mask)
on the host, before the first exchange of its first layer. ``plan_ahead`` builds them on a
background thread while the current step runs, into the plan cache the op reads; the batch's
first call then finds them ready. Nothing else changes:

- The ranks still agree before any exchange: the op's own check (one small all_gather per new
  batch) runs on the path, as for any batch. No collective ever runs on the planning thread.
- Plans are cached under the metadata's content digest (``planning/cache.py``): a batch planned
  ahead can only serve a call with the same metadata content, layout, mask, shapes and dtype. A
  call whose plans are not ready (other metadata, another dtype, planning still running or
  failed) plans on the spot, exactly as without ``plan_ahead``, and a planning error surfaces
  there, on every rank.

The planning thread holds the cache's lock only to look up and store, never while building, so
the step it overlaps does not wait on it; it does share the interpreter lock with the step's
Python, and on CPUs the cores.

Shape legend: B batch rows, S whole sequence, P ranks, L = S / P local rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .comm import communicator, group_size, process_group
from .info import SequenceInfo
from .kernels import KERNELS
from .layout import Layout
from .planning.flexmask import FlexMask
from .planning.masks import MaskSpec
from .prepare import RingArgs, mask_arguments, plan_call
from .stats import planning_ahead

_PLANNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemma4_flexring-plan-ahead")


def plan_ahead(info: SequenceInfo, masks: Iterable[MaskSpec | FlexMask], *, layout: Layout | None = None, group=None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
               kernel: str | None = None) -> Future:
    """Build this rank's plans and exchange schedules for a batch's masks, on a background thread.

    Call it with the ``info`` and ``layout`` the batch's ``ring_attention`` calls will get (the
    same ``SequenceInfo`` object saves hashing its metadata again), each distinct ``mask`` of the
    model's layers, and the dtype and device of their queries. Every rank calls it for its own
    part; nothing is exchanged.

    Args:
        info: the batch's whole-sequence metadata, [B, S] fields.
        masks: the layers' masks, MaskSpecs or FlexMasks (duplicates are planned once).
        layout, group, kernel: as for ``ring_attention`` (default: contiguous over the group; the
            device's kernel).
        dtype: the queries' dtype (plans are per dtype).
        device: the queries' device (default: ``info``'s).

    Returns:
        A ``Future`` whose ``result()`` is None once the plans are in the cache, or raises what
        planning raised (the op would raise the same on the path, on every rank).

    Raises:
        TypeError, ValueError: arguments of the wrong type, or a layout for another world size.
    """
    pg = process_group(group)
    world_size = group_size(pg)
    layout = Layout("contiguous", world_size) if layout is None else layout
    specs = list(dict.fromkeys(masks))
    problems = [f"{name} must be a {kind.__name__}, got {type(value).__name__}"
                for name, value, kind in (("info", info, SequenceInfo), ("layout", layout, Layout),
                                          ("dtype", dtype, torch.dtype))
                if not isinstance(value, kind)]
    problems += [f"masks must be MaskSpecs or FlexMasks, got {type(m).__name__}" for m in specs
                 if not isinstance(m, (MaskSpec, FlexMask))]
    if kernel is not None and kernel not in KERNELS:
        problems.append(f"kernel must be one of {sorted(KERNELS)} or None, got {kernel!r}")
    if problems:
        raise TypeError("plan_ahead: " + "; ".join(problems))
    if layout.world_size != world_size:
        raise ValueError(f"plan_ahead: layout is for {layout.world_size} ranks, the group has {world_size}")
    batch, seq_len = info.document_ids.shape
    layout.check_length(seq_len)
    device = info.document_ids.device if device is None else torch.device(device)
    # The op reads q's chunk length, dtype and device only: an empty stand-in of that shape.
    q = torch.empty((0, 0, seq_len // world_size, 0), dtype=dtype, device=device)
    table = layout.table(seq_len)
    name = "" if pg is None else pg.group_name
    fields = [t.to(device) for t in info.tensors()]
    calls = [RingArgs(q, q, q, info.generation, *fields, table, group_name=name, scale=None, kernel_name=kernel or "",
                      **mask_arguments(spec, device)) for spec in specs]
    return _PLANNER.submit(_plan, calls, communicator(pg))


def wait_for_planning() -> None:
    """Return once every ``plan_ahead`` started so far has finished (benchmarks and tests)."""
    _PLANNER.submit(lambda: None).result()


def _plan(calls: list[RingArgs], comm) -> None:
    with planning_ahead():
        for args in calls:
            plan_call(args, comm)
