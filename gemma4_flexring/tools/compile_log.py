"""What dynamo reports about each compile of a function: its guards and why it recompiled.

Guards come from dynamo's ``guards`` artifact logger (the one ``TORCH_LOGS=guards`` prints): while
``capture_guards()`` is active a handler on that logger keeps the guard tree of every compile,
keyed by compile id (``"0/1"``: frame 0, second compile), and nothing is printed. Recompile
reasons come from dynamo's compilation metrics (``torch._dynamo.utils.get_compilation_metrics``),
which record the failed guard of every recompile whether or not logging is on.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator, NamedTuple

import torch
import torch._dynamo.utils
import torch._guards


class Guard(NamedTuple):
    """One guard of a compiled frame: its kind (``TENSOR_MATCH``, ``NONE_MATCH``, ...) and code."""

    kind: str
    code: str


class CompileRecord(NamedTuple):
    """One dynamo compile of a frame; ``reason`` is None for the frame's first compile."""

    compile_id: str
    reason: str | None


# Kinds that say nothing about the inputs' values or shapes: bookkeeping dynamo adds everywhere.
_BOOKKEEPING = frozenset({"DIMENSION_DYNAMIC_MARKING_GUARD", "TYPE_MATCH", "ID_MATCH", "DICT_CONTAINS",
                          "NO_TENSOR_ALIASING", "GLOBAL_STATE", "TORCH_FUNCTION_MODE_STACK", "DEFAULT_DEVICE"})
# Kinds that pin a value: a different value recompiles.
_VALUE_PINS = frozenset({"EQUALS_MATCH", "TRUE_MATCH", "FALSE_MATCH"})
_TREE_LINE = re.compile(r"^[| ]*\+- ([A-Z_]+): (.*?)(?:\s+# .*)?$")
_TENSOR_MATCH = re.compile(r"check_tensor\((.*?), \w+, DispatchKeySet\(.*?\), torch\.(\w+), device=(\w+), "
                           r"requires_grad=(\w+), size=(\[.*?\]), stride=(\[.*?\])\)")


class _Keep(logging.Handler):
    """Keeps the guards of each logged guard tree under the id of the compile that logged it."""

    def __init__(self, guards: dict[str, list[Guard]]) -> None:
        super().__init__(logging.DEBUG)
        self.guards = guards

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.lstrip().startswith("TREE_GUARD_MANAGER"):
            self.guards[str(torch._guards.CompileContext.current_compile_id())] = parse_guard_tree(message)


@contextlib.contextmanager
def capture_guards() -> Iterator[dict[str, list[Guard]]]:
    """Collect the guards of every compile in the block, without printing them.

    Yields:
        A dict filled as compiles happen: compile id -> that compile's guards, in dynamo's order.
        The logger's level, propagation and handlers are restored on exit.
    """
    log = torch._logging.getArtifactLogger("torch._dynamo.guards", "guards")
    guards: dict[str, list[Guard]] = {}
    handler = _Keep(guards)
    saved = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False  # keep the trees out of the handlers of torch's own loggers
    try:
        yield guards
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def parse_guard_tree(tree: str) -> list[Guard]:
    """The guards of a printed guard manager tree (``TREE_GUARD_MANAGER: ...``), source comments dropped."""
    return [Guard(m[1], m[2]) for m in map(_TREE_LINE.match, tree.splitlines()) if m]


def compiles_of(code_name: str) -> list[CompileRecord]:
    """Every compile dynamo recorded for frames of code named ``code_name``, oldest first.

    Dynamo keeps the last 64 compiles of the process: call this soon after the compiles.
    """
    return [CompileRecord(str(m.compile_id), _failed_guards(m.recompile_reason))
            for m in torch._dynamo.utils.get_compilation_metrics() if m.co_name == code_name]


def _failed_guards(reason: str | None) -> str | None:
    # Dynamo appends the user stack of the failed guard's source; the guard lines say enough.
    return None if reason is None else reason.split("\nUser stack trace:")[0].strip()


def interesting_guards(guards: list[Guard], inputs: tuple[str, ...]) -> list[Guard]:
    """The guards a user can act on: those on the call's inputs and those pinning a value.

    Args:
        guards: a compile's guards.
        inputs: names of the compiled frame's locals that hold the call's inputs (guards on other
            locals, such as a closure's module and its parameters, are kept only when they pin a
            value, like ``L['fn'].mask.sliding_window == 8``).

    Dynamo's bookkeeping kinds (types, object ids, dynamic-dim markers, global state) are dropped.
    """
    on_inputs = re.compile("|".join(rf"\bL\['{re.escape(name)}'\]" for name in inputs))
    return [g for g in guards
            if g.kind not in _BOOKKEEPING and (g.kind in _VALUE_PINS or on_inputs.search(g.code))]


def format_guard(guard: Guard) -> str:
    """``guard`` on one short line; a tensor match reads ``SOURCE: float32 size=[...] stride=[...]``."""
    code = _TENSOR_MATCH.sub(
        lambda m: f"{m[1]}: {m[2]} size={m[5]} stride={m[6]}"
                  + ("" if m[3] == "None" else f" device={m[3]}") + (" requires_grad" if m[4] == "True" else ""),
        guard.code)
    return f"{guard.kind}: {code}"
