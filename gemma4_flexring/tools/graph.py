"""``python -m gemma4_flexring graph``: what ``torch.compile`` makes of a model over a few batches.

Compiles the model once (``fullgraph=True``, dynamic sizes unless ``--static``), runs every batch
forward and backward, and prints: per batch, whether it compiled, reused the compiled code or
recompiled (with dynamo's reason); per compile, the ``gemma4_flexring`` op calls with named
arguments, the guards on the inputs and on values, and the AOT forward and backward graphs.

The model comes from a factory, named ``module:attribute`` (``--model mypkg.mod:make``; the
module is imported, so it must be on ``sys.path``). Default: ``gemma4_flexring.testing.model:example``.

Factory protocol: a callable taking no arguments and returning ``(fn, batches)``, where
    fn: an ``nn.Module`` or a function (calling ``ring_attention`` somewhere inside);
    batches: a list of ``(args, kwargs)`` pairs, a tuple of positional and a dict of keyword
        arguments per call. Vary lengths and metadata (a ``SequenceInfo`` or None, which of its
        tensors are present) to see which changes recompile.

Example::

    def make():
        layer = MyLayer()
        return layer, [((torch.randn(1, n, 64),), {"info": SequenceInfo(...)}) for n in (16, 32)]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import textwrap
from typing import Any, Callable

import torch

from .compile_log import format_guard
from .graphs import Batch, Compile, compile_batches, ring_op_calls, value_type

DEFAULT_MODEL = "gemma4_flexring.testing.model:example"


def load_factory(spec: str) -> Callable[[], tuple[Callable[..., Any], list[Batch]]]:
    """The factory named ``module:attribute``.

    Raises:
        ValueError: ``spec`` is not ``module:attribute`` or does not name a callable.
        ImportError: the module cannot be imported.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--model must be module:attribute, got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(factory):
        raise ValueError(f"{spec} is not a callable in {module_name}")
    return factory


def checked_example(example: Any, spec: str) -> tuple[Callable[..., Any], list[Batch]]:
    """``(fn, batches)`` from a factory's return value, or ValueError saying what is off."""
    if not (isinstance(example, tuple) and len(example) == 2 and callable(example[0])):
        raise ValueError(f"{spec} must return (fn, batches) with fn callable")
    fn, batches = example
    batches = list(batches)
    if not batches or not all(isinstance(b, tuple) and len(b) == 2 and isinstance(b[0], tuple)
                              and isinstance(b[1], dict) for b in batches):
        raise ValueError(f"{spec} must return at least one batch, each (args tuple, kwargs dict)")
    return fn, batches


def format_report(compiles: list[Compile], batches: list[Batch], all_guards: bool = False) -> str:
    """What happened per batch, then each compile's op calls, guards and graphs."""
    by_batch = {c.batch: c for c in compiles}
    lines = [f"frames compiled: {len(compiles)} over {len(batches)} batches"]
    for index, (args, kwargs) in enumerate(batches):
        inputs = ", ".join(value_type(t) for t in torch.utils._pytree.tree_leaves((args, kwargs)))
        c = by_batch.get(index)
        if c is None:
            lines.append(f"batch {index} ({inputs}): reused the compiled code")
        elif c.reason is None:
            lines.append(f"batch {index} ({inputs}): compiled {c.compile_id}")
        else:
            lines.append(f"batch {index} ({inputs}): recompiled {c.compile_id}, failed guard(s):")
            lines.append(textwrap.indent(c.reason, "    "))
    for c in compiles:
        lines += ["", f"## compile {c.compile_id} (batch {c.batch})", "op calls:"]
        lines += [f"  {kind}: {call}" for kind, gm in zip(("forward", "backward"), c.graphs) if gm is not None
                  for call in ring_op_calls(gm)]
        shown = c.guards if all_guards else c.input_guards()
        which = "all" if all_guards else "on inputs and values (--all-guards for all)"
        lines.append(f"guards: {len(c.guards)}; {len(shown)} shown, {which}:")
        lines += [f"  {format_guard(g)}" for g in shown]
        lines.append(str(c.graphs))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m gemma4_flexring graph``: compile a model once, run a few batches, show what happened."""
    parser = argparse.ArgumentParser(prog="python -m gemma4_flexring graph", description=main.__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"factory module:attribute returning (fn, batches) (default {DEFAULT_MODEL})")
    parser.add_argument("--static", action="store_true", help="compile for the given sizes (default: dynamic)")
    parser.add_argument("--forward-only", action="store_true", help="run under no_grad: no backward graph")
    parser.add_argument("--all-guards", action="store_true", help="print every guard, bookkeeping included")
    args = parser.parse_args(argv)
    try:
        fn, batches = checked_example(load_factory(args.model)(), args.model)
    except (ValueError, ImportError) as e:
        parser.error(str(e))
    with torch.no_grad() if args.forward_only else contextlib.nullcontext():
        compiles = compile_batches(fn, batches, dynamic=not args.static)
    print(f"# {args.model}: {len(batches)} batches, fullgraph, {'static' if args.static else 'dynamic'} shapes"
          f"{', forward only' if args.forward_only else ''}")
    print(format_report(compiles, batches, args.all_guards))
    return 0
