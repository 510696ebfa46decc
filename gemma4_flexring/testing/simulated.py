"""A simulated ring: every rank of a group as a thread of this process, exchanging copies.

NCCL cannot run several ranks on one GPU, and spawning gloo processes is slow; a
``SimulatedGroup`` runs the same op, planning, agreement, exchange schedule and kernels for all
P ranks in one process, on one device::

    group = SimulatedGroup(4)
    outs = group.run(lambda rank, world_size: ring_attention(q[rank], k[rank], v[rank], group=group, ...))

Each rank runs in its own thread (``run``); ``ring_attention(..., group=group)`` finds its rank
from the thread. Point-to-point messages between two ranks match in posting order, as with
``batch_isend_irecv``: the n-th receive a rank posts from a peer takes the n-th message that peer
sent it. Whichever of the two is posted second copies the message, and both complete then, as
NCCL's rendezvous does: a sender may reuse its buffer once its send completed. Collectives (the
agreement) meet at a barrier. Once a rank raises, its peers' waits fail at once (a message it will
never send, a collective it will never join) instead of running into ``TIMEOUT_S``.

The engine never names this module: importing it registers ``SimulatedGroup`` as a group kind
with ``comm.register_group_kind`` (name lookup, communicator, all_gather).
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from typing import Callable, Sequence

from torch import Tensor

from ..comm import GroupKind, register_group_kind
from ..stats import record_send

TIMEOUT_S = 120  # a wait longer than this is a schedule that cannot match: fail, do not hang
POLL_S = 0.05  # how often a waiting message looks whether a peer failed

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
        self._failed = threading.Event()  # set when a rank raised: the waits of its peers fail
        self._mail = self._mailboxes()
        self._barrier = _Barrier(world_size, self._failed)
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
                self._barrier.abort()  # sets _failed: peers waiting on its messages or in a collective fail

        threads = [threading.Thread(target=body, args=(r,), name=f"{self.group_name}.{r}") for r in range(self._size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:  # start the next run afresh: no failure, no message left unmatched
            self._barrier.reset()
            self._mail = self._mailboxes()
            raise RuntimeError("simulated ring failed:\n" + "\n".join(sorted(errors)))
        return results

    def _mailboxes(self) -> dict[tuple[int, int], "_Mailbox"]:
        return {(src, dst): _Mailbox(self._failed) for src in range(self._size) for dst in range(self._size)}

    def all_gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (a collective: every rank must call it)."""
        self._slots[self.rank()] = obj
        self._barrier.wait()
        gathered = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before everybody has read them
        return gathered

    def send(self, src: int, dst: int, tensor: Tensor) -> "_Done":
        return self._mail[(src, dst)].post(tensor, sending=True)

    def receive_into(self, src: int, dst: int, tensor: Tensor) -> "_Done":
        return self._mail[(src, dst)].post(tensor, sending=False)


class _Barrier:
    """A barrier whose abort fails only the waits it interrupts; ``failed`` is the group's failure,
    set by ``abort`` and cleared by ``reset`` (message waits read it too).

    ``threading.Barrier.abort`` also fails a waiter that was already released but had not yet
    woken: a rank that passed a collective, then raised and aborted, broke its peer's completed
    wait. Here a wait returns once its own generation completed, whatever happens after.
    """

    def __init__(self, parties: int, failed: threading.Event) -> None:
        self._parties = parties
        self._failed = failed
        self._cond = threading.Condition()
        self._arrived = 0
        self._generation = 0

    def wait(self) -> None:
        with self._cond:
            if self._failed.is_set():
                raise threading.BrokenBarrierError
            generation = self._generation
            self._arrived += 1
            if self._arrived == self._parties:
                self._arrived, self._generation = 0, generation + 1
                self._cond.notify_all()
                return
            if not self._cond.wait_for(lambda: self._generation != generation or self._failed.is_set(), TIMEOUT_S):
                self.abort()  # a timeout breaks it for every waiter
                raise RuntimeError(f"simulated ring: a collective waited {TIMEOUT_S} s for its peers")
            if self._generation == generation:
                raise threading.BrokenBarrierError

    def abort(self) -> None:
        """Fail every wait in progress and every later one, until ``reset``."""
        with self._cond:
            self._failed.set()
            self._cond.notify_all()

    def reset(self) -> None:
        with self._cond:
            self._arrived = 0
            self._failed.clear()


class _Done:
    """Completes when its message has been copied (``batch_isend_irecv``'s work objects' ``wait``);
    its wait fails once ``failed`` is set (a peer raised) while the message has not come."""

    def __init__(self, failed: threading.Event) -> None:
        self._event = threading.Event()
        self._failed = failed

    def set(self) -> "_Done":
        self._event.set()
        return self

    def wait(self) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not self._event.wait(POLL_S):
            if self._failed.is_set():
                raise RuntimeError("simulated ring: a rank of this group raised; the exchange is abandoned")
            if time.monotonic() > deadline:
                raise RuntimeError(f"simulated ring: a message waited {TIMEOUT_S} s for its peer")


class _Mailbox:
    """The messages from one rank to another: the n-th send meets the n-th receive."""

    def __init__(self, failed: threading.Event) -> None:
        self._failed = failed
        self._lock = threading.Lock()
        self._waiting: tuple[dict, dict] = ({}, {})  # per side (receives, sends): n -> (tensor, done)
        self._posted = [0, 0]  # receives, sends

    def post(self, tensor: Tensor, sending: bool) -> _Done:
        with self._lock:
            n = self._posted[sending]
            self._posted[sending] += 1
            peer = self._waiting[not sending].pop(n, None)
            if peer is None:
                done = _Done(self._failed)
                self._waiting[sending][n] = (tensor, done)
                return done
            other, other_done = peer
            (other if sending else tensor).copy_(tensor if sending else other)
            other_done.set()
            return _Done(self._failed).set()


def lookup(group_name: str) -> SimulatedGroup | None:
    """The simulated group of that name, None for any other name."""
    return _REGISTRY.get(group_name)


class SimulatedComm:
    """``comm.Communicator`` over a ``SimulatedGroup``, for the calling thread's rank."""

    def __init__(self, group: SimulatedGroup) -> None:
        self.group = group
        self.rank = group.rank()
        self.world_size = group.size()

    def start(self, sends: Sequence[tuple[int, Tensor]], recvs: Sequence[tuple[int, Tensor]]) -> list:
        """Post every (peer, tensor) send and receive; each completes once its message is copied."""
        works = [self.group.send(self.rank, peer, t) for peer, t in sends]
        works += [self.group.receive_into(peer, self.rank, t) for peer, t in recvs]
        if sends:
            record_send(sum(t.numel() * t.element_size() for _, t in sends))
        return works


register_group_kind(GroupKind(SimulatedGroup, lookup, SimulatedComm, lambda group, obj: group.all_gather(obj)))
