"""The process-wide generation counter behind ``SequenceInfo.generation``.

A generation names one batch's metadata. It is handed out by the custom op
``gemma4_flexring::new_generation`` (registered in ``ops.py``), never by Python code that
dynamo or ``torch.export`` could trace into a constant: compiled and exported programs call the
op at run time, so every call, and every loaded copy of a program, gets a new value.
"""

from __future__ import annotations

import os
import threading

_LOCK = threading.Lock()


def _random_start() -> int:
    # Each process counts from its own random point (below 2**56, leaving room to count): a
    # SequenceInfo built in another process (a DataLoader worker, forked or spawned) and sent here
    # must not carry a generation this process also hands out.
    return int.from_bytes(os.urandom(7), "little") + 1


_last = _random_start()


def _reseed() -> None:
    global _last
    _last = _random_start()


os.register_at_fork(after_in_child=_reseed)


def next_generation() -> int:
    """A positive int larger than every generation this process handed out before, and with
    overwhelming probability one that no other process hands out."""
    global _last
    with _LOCK:
        _last += 1
        return _last
