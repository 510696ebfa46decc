"""A simulated ring: every rank of a group as a thread of this process, exchanging by reference.

NCCL cannot run several ranks on one GPU, and spawning gloo processes is slow; a
``SimulatedGroup`` runs the same op, planning, agreement, exchange schedule and kernels for all
P ranks in one process, on one device::

    group = SimulatedGroup(4)
    outs = group.run(lambda rank, world_size: ring_attention(q[rank], k[rank], v[rank], group=group, ...))

Each rank runs in its own thread (``run``); ``ring_attention(..., group=group)`` finds its rank
from the thread. Point-to-point messages go through one FIFO queue per (sender, receiver) pair,
so messages between two ranks match in posting order, as with ``batch_isend_irecv``. A send
hands over its tensor by reference and completes at once; the receiver copies it out when it
waits. This is sound because the ring never writes to a tensor after sending it (sends are fresh
packed rows, fresh dK/dV partial sums, or the rank's untouched input). Collectives (the
agreement) meet at a barrier.
"""

from __future__ import annotations

import itertools
import queue
import threading
import traceback
from typing import Callable, Sequence

from torch import Tensor

from .stats import record_send

TIMEOUT_S = 120  # a wait longer than this is a schedule that cannot match: fail, do not hang

_REGISTRY: dict[str, "SimulatedGroup"] = {}
_NAMES = itertools.count()


class SimulatedGroup:
    """``world_size`` ranks in this process (see the module doc); ``group_name`` resolves to it."""

    def __init__(self, world_size: int) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"SimulatedGroup world_size must be a positive int, got {world_size!r}")
        self._size = world_size
        self.group_name = f"gemma4_flexring.simulated.{next(_NAMES)}"
        self._local = threading.local()
        self._mail = {(src, dst): queue.Queue() for src in range(world_size) for dst in range(world_size)}
        self._barrier = threading.Barrier(world_size, timeout=TIMEOUT_S)
        self._slots: list = [None] * world_size
        _REGISTRY[self.group_name] = self

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        rank = getattr(self._local, "rank", None)
        if rank is None:
            raise RuntimeError(f"{self.group_name}: not called from one of its ranks (use SimulatedGroup.run)")
        return rank

    def run(self, fn: Callable[[int, int], object]) -> list:
        """``fn(rank, world_size)`` on every rank, each in its own thread: the per-rank results.

        Raises:
            RuntimeError: naming every rank that raised, with its traceback.
        """
        results: list = [None] * self._size
        errors: list[str] = []

        def body(rank: int) -> None:
            self._local.rank = rank
            try:
                results[rank] = fn(rank, self._size)
            except BaseException:  # noqa: BLE001 - reported by run
                errors.append(f"rank {rank}:\n{traceback.format_exc()}")
                self._barrier.abort()  # peers waiting in a collective fail instead of hanging

        threads = [threading.Thread(target=body, args=(r,), name=f"{self.group_name}.{r}") for r in range(self._size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self._barrier.reset()
            raise RuntimeError("simulated ring failed:\n" + "\n".join(sorted(errors)))
        return results

    def all_gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (a collective: every rank must call it)."""
        self._slots[self.rank()] = obj
        self._barrier.wait()
        gathered = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before everybody has read them
        return gathered

    def send(self, src: int, dst: int, tensor: Tensor) -> None:
        self._mail[(src, dst)].put(tensor)

    def receive_into(self, src: int, dst: int, tensor: Tensor) -> None:
        try:
            tensor.copy_(self._mail[(src, dst)].get(timeout=TIMEOUT_S))
        except queue.Empty:
            raise RuntimeError(f"{self.group_name}: rank {dst} waited {TIMEOUT_S} s for rank {src}") from None


def lookup(group_name: str) -> SimulatedGroup | None:
    """The simulated group of that name, None for any other name."""
    return _REGISTRY.get(group_name)


class _Receive:
    def __init__(self, group: SimulatedGroup, src: int, dst: int, tensor: Tensor) -> None:
        self._args = (src, dst, tensor)
        self._group = group

    def wait(self) -> None:
        self._group.receive_into(*self._args)


class SimulatedComm:
    """``RingComm``'s interface over a ``SimulatedGroup``, for the calling thread's rank."""

    def __init__(self, group: SimulatedGroup) -> None:
        self.group = group
        self.rank = group.rank()
        self.world_size = group.size()

    def start(self, sends: Sequence[tuple[int, Tensor]], recvs: Sequence[tuple[int, Tensor]]) -> list:
        """Hand every (peer, tensor) send over; the receives complete when waited on."""
        for peer, t in sends:
            self.group.send(self.rank, peer, t)
        if sends:
            record_send(sum(t.numel() * t.element_size() for _, t in sends))
        return [_Receive(self.group, peer, self.rank, t) for peer, t in recvs]
