"""What ``torch.compile`` makes of code that calls ``ring_attention``: the AOT graphs as text.

``compiled_graphs(fn, *args)`` compiles ``fn`` (a function or an ``nn.Module``) with
``fullgraph=True``, runs it once forward and once backward, and returns the forward and backward
graphs that AOTAutograd hands to the compiler backend, normalized so that they read (and diff)
the same on every machine: no source comments, no strides or devices, one graph class name.
The ring ops show up as ``torch.ops.gemma4_flexring.ring_attention.default`` and
``torch.ops.gemma4_flexring.ring_attention_backward.default``.

``python -m gemma4_flexring graph`` prints them for a small Gemma 4 attention layer
(``Gemma4Attention``).
"""

from __future__ import annotations

import argparse
import itertools
import re
import types
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from .info import SequenceInfo
from .model import Gemma4Attention


_compiles = itertools.count()


class Graphs(NamedTuple):
    """Normalized graph texts; ``backward`` is None when no output needed a gradient."""

    forward: str
    backward: str | None

    def __str__(self) -> str:
        parts = ["# forward", self.forward]
        if self.backward is not None:
            parts += ["# backward", self.backward]
        return "\n".join(parts)


def normalize_graph(gm: torch.fx.GraphModule) -> str:
    """``gm``'s readable code with comments, strides, devices and blank lines removed.

    Graph class names (``GraphModule``, ``<lambda>``, ...) all become ``GraphModule``.
    """
    text = gm.print_readable(print_output=False, include_stride=False, include_device=False, colored=False)
    lines = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        code = re.sub(r"^(\s*)class [^(]*\(torch\.nn\.Module\):", r"\1class GraphModule(torch.nn.Module):", line.rstrip())
        lines.append(code)
    return "\n".join(lines) + "\n"


def compiled_graphs(fn: Callable[..., Any], *args: Any, dynamic: bool | None = True, **kwargs: Any) -> Graphs:
    """Compile ``fn`` with ``fullgraph=True`` and return its AOT forward and backward graphs.

    ``fn`` runs once forward on detached copies of the tensor inputs (``requires_grad`` kept);
    when an output requires grad, a backward follows through ``torch.autograd.grad``, so no
    ``.grad`` field changes. Compilation is fresh and independent of earlier ones: nothing compiled
    before is reused and nothing is reset.

    Args:
        fn: a function or ``nn.Module`` calling ``ring_attention``.
        *args, **kwargs: its inputs.
        dynamic: passed to ``torch.compile`` (default True: sizes appear as symbols).

    Returns:
        ``Graphs(forward, backward)`` as normalized text.
    """
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    captured: dict[str, torch.fx.GraphModule] = {}

    def keep(name: str):
        def compiler(gm: torch.fx.GraphModule, example_inputs):
            captured[name] = gm
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))

    def call(*a, **kw):
        return fn(*a, **kw)

    # Dynamo keeps compiled code per code object and automatic-dynamic sizes per code location
    # (file, line, name): a copy of ``call``'s code under a new name makes this compile fresh,
    # independent of earlier ones, without resetting anything the caller compiled.
    name = f"compiled_graphs_{next(_compiles)}"
    fresh = types.FunctionType(call.__code__.replace(co_name=name, co_qualname=name), call.__globals__, name,
                               None, call.__closure__)
    # Fresh leaves: the caller's tensors keep their .grad, and tensors dynamo saw in an earlier
    # compile (which would change how their sizes are named) are not reused.
    args, kwargs = torch.utils._pytree.tree_map_only(
        Tensor, lambda t: t.detach().clone().requires_grad_(t.requires_grad), (args, kwargs))
    compiled = torch.compile(fresh, backend=backend, fullgraph=True, dynamic=dynamic)
    out = compiled(*args, **kwargs)
    outputs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
    leaves = _autograd_leaves(outputs)
    if leaves:
        torch.autograd.grad(outputs, leaves, [torch.ones_like(t) for t in outputs], allow_unused=True)
    if "forward" not in captured:
        raise RuntimeError("compiled_graphs: nothing was compiled")
    backward = captured.get("backward")
    return Graphs(normalize_graph(captured["forward"]), None if backward is None else normalize_graph(backward))


def _autograd_leaves(outputs: list[Tensor]) -> list[Tensor]:
    """Every leaf tensor the outputs' autograd graph accumulates into (inputs, parameters, and
    tensors captured by closures alike): differentiating with respect to them fills no .grad."""
    leaves, seen, stack = {}, set(), [t.grad_fn for t in outputs]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad
        if variable is not None:
            leaves[id(variable)] = variable
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(leaves.values())


def main(argv: list[str] | None = None) -> int:
    """``python -m gemma4_flexring graph``: print a small layer's compiled forward and backward graphs."""
    parser = argparse.ArgumentParser(prog="python -m gemma4_flexring graph", description=main.__doc__)
    parser.add_argument("--seq-len", type=int, default=16, help="sequence length (default 16)")
    parser.add_argument("--sliding-window", type=int, default=8,
                        help="window of the sliding layer (default 8); 0 for a global layer")
    parser.add_argument("--documents", type=int, default=2,
                        help="packed documents in the sequence (default 2; 1: no SequenceInfo)")
    parser.add_argument("--static", action="store_true", help="compile for the given sizes (default: dynamic)")
    parser.add_argument("--forward-only", action="store_true", help="no backward graph")
    args = parser.parse_args(argv)
    if args.seq_len < 1 or args.documents < 1 or args.sliding_window < 0:
        parser.error("--seq-len and --documents must be positive, --sliding-window non-negative")

    torch.manual_seed(0)
    layer = Gemma4Attention(sliding_window=args.sliding_window or None)
    hidden = torch.randn(1, args.seq_len, 32, requires_grad=not args.forward_only)
    info = None
    if args.documents > 1:
        documents = torch.arange(args.seq_len) * args.documents // args.seq_len
        info = SequenceInfo(document_ids=documents.view(1, -1))
    if args.forward_only:
        layer.requires_grad_(False)
    graphs = compiled_graphs(layer, hidden, info=info, dynamic=not args.static)
    kind = f"sliding (window {args.sliding_window})" if args.sliding_window else "global"
    print(f"# Gemma 4 attention layer, {kind}, seq_len {args.seq_len}, "
          f"{args.documents} document(s), {'static' if args.static else 'dynamic'} shapes")
    print(graphs)
    return 0
