"""Process groups as the ring sees them: which group a call means, its size, gathering small
objects across it, and the communicator that moves the ring's rows.

A group is a ``torch.distributed`` ``ProcessGroup`` (found again from its name inside the op, as
groups travel to the custom op by name), ``None`` (a world of one), or an object of a registered
group kind (``register_group_kind``): a stand-in with its own name registry, gathering and
communicator. The simulated ring (``testing/simulated.py``) registers itself that way when it is
imported, so the engine never names it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .stats import record_send


class Communicator(Protocol):
    """Posts one ring step's point-to-point messages within a group, by group rank."""

    group: Any  # the resolved group (None: a world of one)
    rank: int
    world_size: int

    def start(self, sends: Sequence[tuple[int, Tensor]], recvs: Sequence[tuple[int, Tensor]]) -> list:
        """Post every (peer, tensor) send and receive; returns works whose ``wait()`` completes them.
        Messages between two ranks match in posting order."""


class GroupKind(NamedTuple):
    """A kind of group that is not a ``ProcessGroup``.

    Attributes:
        type: its class; instances have ``group_name``, ``size()`` and ``rank()``.
        lookup: the group of a name, None for a name that is not of this kind.
        communicator: the ``Communicator`` of a group for the calling rank.
        all_gather: every rank's picklable object, in rank order.
    """

    type: type
    lookup: Callable[[str], Any]
    communicator: Callable[[Any], Communicator]
    all_gather: Callable[[Any, Any], list]


_KINDS: list[GroupKind] = []


def register_group_kind(kind: GroupKind) -> None:
    """Make ``kind``'s groups usable wherever a group is taken (once per type)."""
    if all(k.type is not kind.type for k in _KINDS):
        _KINDS.append(kind)


def _kind_of(group) -> GroupKind | None:
    for kind in _KINDS:
        if isinstance(group, kind.type):
            return kind
    return None


def process_group(group=None):
    """The group a call means: a ``ProcessGroup`` or a registered kind's group as given, a 1-D
    ``DeviceMesh``'s group, or for None the default group (None when torch.distributed is not
    initialized: a world of one).

    Raises:
        TypeError: ``group`` is none of these.
        ValueError: a ``DeviceMesh`` of more than one dimension.
    """
    if group is None:
        if not dist.is_available() or not dist.is_initialized():
            return None
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group  # checked first and alone: dynamo cannot run other isinstance checks on a ProcessGroup
    if _kind_of(group) is not None:
        return group
    get_group = getattr(group, "get_group", None)  # DeviceMesh
    if get_group is None:
        kinds = "".join(f", a {k.type.__name__}" for k in _KINDS)
        raise TypeError(f"group must be a ProcessGroup, a 1-D DeviceMesh{kinds} or None, got {type(group).__name__}")
    if group.ndim != 1:
        raise ValueError(f"group must be a 1-D DeviceMesh, got {group.ndim} dimensions")
    return get_group()


def group_size(group) -> int:
    """Ranks of a group from ``process_group`` (1 for None)."""
    if group is None:
        return 1
    return dist.get_world_size(group) if isinstance(group, dist.ProcessGroup) else group.size()


def resolve_group(group_name: str):
    """The group named ``group_name`` (as the op receives it); "" is a world of one (None)."""
    if not group_name:
        return None
    for kind in _KINDS:
        group = kind.lookup(group_name)
        if group is not None:
            return group
    return dist.distributed_c10d._resolve_process_group(group_name)


def communicator(group) -> Communicator:
    """The ring's communicator over a resolved group, for the calling rank."""
    kind = _kind_of(group)
    return RingComm(group) if kind is None else kind.communicator(group)


def all_gather_object(group, obj) -> list:
    """Every rank's picklable ``obj``, in rank order (a resolved, non-None group)."""
    kind = _kind_of(group)
    if kind is not None:
        return kind.all_gather(group, obj)
    gathered: list = [None] * group.size()
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def all_gather_ints(group, row: list[int]) -> list[list[int]]:
    """Every rank's ``row`` of int64s, in rank order, as one tensor collective (a resolved,
    non-None group; rows of equal length)."""
    kind = _kind_of(group)
    if kind is not None:
        return kind.all_gather(group, list(row))
    # NCCL groups only move CUDA tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(group.size())]
    dist.all_gather(table, mine, group=group)
    return [t.cpu().tolist() for t in table]


class RingComm:
    """``Communicator`` over a ``ProcessGroup`` (None: a world of one)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank = 0 if group is None else group.rank()
        self.world_size = 1 if group is None else group.size()
        self._global = [r if group is None else dist.get_global_rank(group, r) for r in range(self.world_size)]

    def start(self, sends: Sequence[tuple[int, Tensor]], recvs: Sequence[tuple[int, Tensor]]) -> list:
        """Post every (peer, tensor) send and receive in one ``batch_isend_irecv``; nothing when
        there is nothing to exchange."""
        ops = [dist.P2POp(dist.isend, t, self._global[peer], self.group) for peer, t in sends]
        ops += [dist.P2POp(dist.irecv, t, self._global[peer], self.group) for peer, t in recvs]
        if not ops:
            return []
        record_send(sum(t.numel() * t.element_size() for _, t in sends))
        return dist.batch_isend_irecv(ops)
