"""Long-lived gloo worker processes for distributed tests.

A ``Cluster`` spawns ``world_size`` processes once; ``run(fn, *args)`` calls the module-level
``fn(rank, world_size, *args)`` on every rank and returns the per-rank results, re-raising a
worker's exception with its traceback. Spawning once per world size keeps the suite fast.
"""

from __future__ import annotations

import contextlib
import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gemma4_flexring.testing.launch import local_init_method

# Guards against a hung collective only; no test measures time.
HANG_TIMEOUT_S = 600


class WorkerError(RuntimeError):
    pass


def _serve(rank: int, world_size: int, init_method: str, conn) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
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
        dist.destroy_process_group()


class Cluster:
    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self._rendezvous = contextlib.ExitStack()
        init_method = self._rendezvous.enter_context(local_init_method())
        self.world_size = world_size
        self.conns, self.procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(rank, world_size, init_method, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def run(self, fn, *args) -> list:
        """Per-rank results of ``fn(rank, world_size, *args)``; WorkerError if any rank raised."""
        replies = self._call(fn, args)
        errors = [(r, payload) for r, (status, payload) in enumerate(replies) if status == "error"]
        if errors:
            raise WorkerError("\n".join(f"rank {r}: {name}: {msg}\n{tb}" for r, (name, msg, tb) in errors))
        return [payload for _, payload in replies]

    def errors(self, fn, *args) -> list[tuple[str, str]]:
        """Run ``fn`` expecting every rank to raise; the per-rank (exception name, message)."""
        return [(payload[0], payload[1]) if status == "error" else ("", "") for status, payload in self._call(fn, args)]

    def _call(self, fn, args) -> list[tuple[str, object]]:
        for conn in self.conns:
            conn.send((fn, args))
        replies = []
        for rank, conn in enumerate(self.conns):
            if not conn.poll(HANG_TIMEOUT_S):
                self.close()
                raise WorkerError(f"rank {rank} did not answer: hung collective?")
            replies.append(conn.recv())
        return replies

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        self._rendezvous.close()
