"""How a command's ranks start: gloo processes it spawns on this machine (``testing.launch.spawn``),
or the processes of ``torchrun`` (NCCL on GPUs the ring has a kernel for, gloo on the CPU).

A command hands ``run`` its per-rank function ``run_rank(rank, world_size, args, device)``, which
returns ``(ok, report)``; ``run`` gives back rank 0's pair, or raises ``WorkerError`` with every
failed rank's error when spawned ranks failed.
"""

from __future__ import annotations

import importlib.util
import os
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ..kernels import kernel_for
from ..testing.launch import WorkerError, spawn

COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # compiling on a busy machine takes minutes
RankFn = Callable[[int, int, object, torch.device], tuple[bool, str]]

__all__ = ["COLLECTIVE_TIMEOUT", "WorkerError", "command", "run", "torchrun_world_size"]


def torchrun_world_size() -> int | None:
    """The world size of the torchrun launch this process belongs to, None when not under torchrun."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def pick_device(local_rank: int) -> torch.device:
    """This rank's GPU when the ring has a kernel for it, else the CPU."""
    if torch.cuda.is_available() and kernel_for(torch.device("cuda")) is not None:
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _spawned(rank: int, world_size: int, run_rank: RankFn, args) -> tuple[bool, str]:
    return run_rank(rank, world_size, args, torch.device("cpu"))


def _under_torchrun(run_rank: RankFn, args) -> tuple[bool, str]:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        ok, report = run_rank(rank, world_size, args, device)
    finally:
        dist.destroy_process_group()
    return ok, report if rank == 0 else ""


def run(run_rank: RankFn, args, world_size: int) -> tuple[bool, str]:
    """Rank 0's ``(ok, report)`` of ``run_rank`` on ``world_size`` ranks: this torchrun launch's
    (every rank returns; ranks other than 0 with an empty report), or freshly spawned gloo ranks.

    Raises:
        WorkerError: spawned ranks failed (each failed rank's error and traceback).
    """
    if torchrun_world_size() is not None:
        return _under_torchrun(run_rank, args)
    (ok, report), *_ = spawn(_spawned, world_size, run_rank, args, collective_timeout=COLLECTIVE_TIMEOUT)
    return ok, report


def command(name: str, run_rank: RankFn, args, world_size: int, check: Callable[[], None]) -> int:
    """A transformers-based command end to end: its exit code (2: bad arguments or no transformers,
    1: a rank failed or the run did not pass, 0: it did). ``check`` raises ValueError on arguments
    no rank could run; it runs before any rank starts. Prints rank 0's report."""
    if importlib.util.find_spec("transformers") is None:
        print(f"{name}: needs transformers: pip install 'gemma4-flexring[hf]'")
        return 2
    try:
        check()
    except ValueError as e:
        print(f"{name}: {e}")
        return 2
    try:
        ok, report = run(run_rank, args, world_size)
    except WorkerError as e:
        print(f"{name}: rank(s) failed:\n{e}")
        return 1
    if report:
        print(report)
    return 0 if ok else 1
