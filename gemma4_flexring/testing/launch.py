"""Starting gloo ranks on this machine: the one launcher of the tests, demo, bench and selfcheck.

Ranks are spawned processes, one torch thread each, joined in a gloo group at a file-store
rendezvous (``local_init_method``). Two faces share that start, the way work reaches the ranks
and the way their errors come back:

- ``Cluster(world_size)``: ranks that stay up; ``run(fn, *args)`` calls the module-level
  ``fn(rank, world_size, *args)`` on every rank and returns the per-rank results. Spawning once
  per world size keeps the test suite fast (its ``cluster`` fixture holds one per size).
- ``spawn(fn, world_size, *args)``: a cluster for one call, closed after it (the commands).

An exception raised on a rank comes back with its type name, message and traceback: ``run``
raises ``WorkerError`` naming every rank that failed, ``errors`` returns the (type name,
message) of each rank. A rank that dies is reported with its exit code (and the cluster, a rank
short, is closed after that call). Once a rank has failed,
its peers get ``PEER_GRACE_S`` to report their own error (peers failing the same check answer
within seconds); ranks still running then are waiting on the failed one and would wait for the
group's timeout (30 minutes by default): they are stopped, and the cluster with them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Callable, Iterator
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PEER_GRACE_S = 120


@contextlib.contextmanager
def local_init_method() -> Iterator[str]:
    """A ``file://`` init_method for ``init_process_group``; its directory goes when the block ends,
    so the ranks that use it must have finished by then.

    Handing the ranks a "free" TCP port (bind to port 0, close, pass the number on) leaves a window
    in which any other socket, gloo's own connections among them, may take that port first; a file
    in a directory nobody else knows cannot be taken.
    """
    with tempfile.TemporaryDirectory(prefix="gemma4_flexring.", ignore_cleanup_errors=True) as directory:
        yield "file://" + os.path.join(directory, "store")


class WorkerError(RuntimeError):
    """One or more ranks raised, died, or did not answer; the message names each with its error."""


def _serve(rank: int, world_size: int, init_method: str | None, collective_timeout: timedelta | None, conn) -> None:
    """A rank's life: join the group (unless ``init_method`` is None), then run jobs ``(fn, args)``
    from ``conn`` until ``None``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if init_method is not None:
        timeout = {} if collective_timeout is None else {"timeout": collective_timeout}
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, **timeout)
    try:
        while True:
            job = conn.recv()
            if job is None:
                break
            fn, args = job
            try:
                conn.send(("ok", fn(rank, world_size, *args)))
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                conn.send(("error", (type(e).__name__, str(e), traceback.format_exc())))
    finally:
        if init_method is not None:
            dist.destroy_process_group()


class Cluster:
    """``world_size`` gloo ranks that stay up between calls (see the module doc).

    Args:
        world_size: ranks to spawn.
        env: environment variables the ranks start with (read at their start, e.g. by malloc).
        collective_timeout: the gloo group's timeout (None: torch's default, 30 minutes).
        answer_timeout_s: how long a call waits for a rank's first answer before it calls the
            rank hung, stops the cluster and raises (None: as long as the ranks run).
        join_group: False leaves torch.distributed uninitialized on the ranks (a process of its
            own without a group: what ``ring_attention`` runs as a world of one).
    """

    def __init__(self, world_size: int, env: dict[str, str] | None = None,
                 collective_timeout: timedelta | None = None, answer_timeout_s: float | None = None,
                 join_group: bool = True) -> None:
        ctx = mp.get_context("spawn")
        self._rendezvous = contextlib.ExitStack()
        init_method = self._rendezvous.enter_context(local_init_method()) if join_group else None
        self.world_size, self.answer_timeout_s, self.closed = world_size, answer_timeout_s, False
        self._conns, self._procs = [], []
        with mock.patch.dict(os.environ, env or {}):  # spawned ranks copy the environment at start
            for rank in range(world_size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(rank, world_size, init_method, collective_timeout, child),
                                   daemon=True)
                proc.start()
                self._conns.append(parent)
                self._procs.append(proc)

    def run(self, fn: Callable, *args) -> list:
        """Per-rank results of ``fn(rank, world_size, *args)``; WorkerError if any rank failed."""
        replies = self._call(fn, args)
        failed = [(rank, payload) for rank, (status, payload) in enumerate(replies) if status == "error"]
        if failed:
            raise WorkerError(_describe(failed))
        return [payload for _, payload in replies]

    def errors(self, fn: Callable, *args) -> list[tuple[str, str]]:
        """Run ``fn`` expecting every rank to raise; the per-rank (exception type name, message),
        ("", "") for a rank that returned."""
        return [(payload[0], payload[1]) if status == "error" else ("", "") for status, payload in self._call(fn, args)]

    def _call(self, fn: Callable, args: tuple) -> list[tuple[str, object]]:
        """Every rank's ("ok", result) or ("error", (type name, message, traceback))."""
        if self.closed:
            raise WorkerError("the cluster was closed (a rank hung or failed in an earlier call)")
        for conn in self._conns:
            conn.send((fn, args))
        replies: dict[int, tuple[str, object]] = {}
        deadline = None if self.answer_timeout_s is None else time.monotonic() + self.answer_timeout_s
        peer_failed = False
        while len(replies) < self.world_size:
            pending = {self._conns[r]: r for r in range(self.world_size) if r not in replies}
            ready = wait(list(pending), None if deadline is None else max(0.0, deadline - time.monotonic()))
            if not ready:
                self.close()
                why = (f"still running {PEER_GRACE_S} s after a peer failed (waiting on it?); stopped" if peer_failed
                       else f"no answer within {self.answer_timeout_s} s (hung collective?); stopped")
                failed = [(r, reply[1]) for r, reply in sorted(replies.items()) if reply[0] == "error"]
                silent = [(r, ("", why, "")) for r in sorted(pending.values())]
                raise WorkerError(_describe(failed + silent))
            for conn in ready:
                rank = pending[conn]
                replies[rank] = self._receive(rank)
                if replies[rank][0] == "error" and not peer_failed:
                    peer_failed, deadline = True, time.monotonic() + PEER_GRACE_S
        if any(not proc.is_alive() for proc in self._procs):
            self.close()
        return [replies[r] for r in range(self.world_size)]

    def _receive(self, rank: int) -> tuple[str, object]:
        try:
            return self._conns[rank].recv()
        except EOFError:  # the rank's process ended without answering
            self._procs[rank].join(timeout=10)
            return "error", ("", f"the process died (exit code {self._procs[rank].exitcode})", "")

    def close(self) -> None:
        """Stop the ranks: asked to leave, killed if they do not (a rank stuck in a collective)."""
        if self.closed:
            return
        self.closed = True
        for conn in self._conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._rendezvous.close()


def _describe(failed: list[tuple[int, tuple[str, str, str]]]) -> str:
    """``rank r: Type: message`` and the traceback, for each failed rank."""
    return "\n".join(f"rank {rank}: {name + ': ' if name else ''}{message}\n{tb}" for rank, (name, message, tb) in failed)


def spawn(fn: Callable, world_size: int, *args, env: dict[str, str] | None = None,
          collective_timeout: timedelta | None = None, join_group: bool = True) -> list:
    """Per-rank results of one call ``fn(rank, world_size, *args)`` on ``world_size`` fresh ranks
    (``Cluster.run``; the keywords as for ``Cluster``); the ranks end with it, once every result
    has arrived (tensors travel as shared-memory handles that their sender must outlive until then)."""
    cluster = Cluster(world_size, env=env, collective_timeout=collective_timeout, join_group=join_group)
    try:
        return cluster.run(fn, *args)
    finally:
        cluster.close()
