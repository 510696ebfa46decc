"""What ``torch.compile`` makes of code that calls ``ring_attention``: graphs, op calls, guards.

``compile_batches(fn, batches)`` compiles ``fn`` (a function or an ``nn.Module``) once with
``fullgraph=True``, runs every batch forward and backward, and returns one ``Compile`` per frame
dynamo compiled: the AOT forward and backward graphs handed to the compiler backend, the frame's
guards and, for a recompile, dynamo's reason. ``compiled_graphs(fn, *args)`` is the one-batch case.

Three views of a graph:
    ``str(graphs)``: the graphs' code, normalized (no comments, strides, devices; one class name;
        ring ops called with keyword arguments).
    ``ring_op_calls(gm)``: each ``gemma4_flexring`` op call with its arguments named from the op's
        schema, e.g. ``ring_attention(q=transpose, k=transpose_1, ..., causal=True, ...)``.
    ``graph_summary(graphs)``: a structural summary for tests to pin, free of what changes between
        torch versions (symbol and placeholder numbering, the order of saved tensors): the forward
        inputs by type, then every call in order, ops named by what they are, arguments by what
        produced them, sizes renumbered ``s0, s1, ...`` in order of first appearance. A graph break
        cannot hide in it (``fullgraph=True`` raises), a missing op call or a forward op called
        again in the backward shows.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import re
import types
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch
from torch import Tensor
from torch.fx.graph import dtype_abbrs

from .compile_log import Guard, capture_guards, compiles_of, interesting_guards

# The namespace of the package's custom ops (``torch.ops.gemma4_flexring.*``).
OP_NAMESPACE = "gemma4_flexring"

# One batch: the positional and keyword arguments of one call.
Batch = tuple[tuple, dict]

_compiles = itertools.count()
# The parameter names of ``_fresh_function``'s wrapper: dynamo's guards name inputs ``L['args'][0]``.
_INPUTS = ("args", "kwargs")


class Graphs(NamedTuple):
    """The AOT graphs of one compile; ``backward`` is None when no output needed a gradient."""

    forward: torch.fx.GraphModule
    backward: torch.fx.GraphModule | None

    def __str__(self) -> str:
        parts = ["# forward", normalize_graph(self.forward)]
        if self.backward is not None:
            parts += ["# backward", normalize_graph(self.backward)]
        return "\n".join(parts)


class Compile(NamedTuple):
    """One compile of the frame: its dynamo id (``"0/1"``), the batch that triggered it, dynamo's
    recompile reason (None for the first compile), its guards and its AOT graphs."""

    compile_id: str
    batch: int
    reason: str | None
    guards: list[Guard]
    graphs: Graphs

    def input_guards(self) -> list[Guard]:
        """The guards on the call's inputs and those pinning a value (``interesting_guards``)."""
        return interesting_guards(self.guards, _INPUTS)


def normalize_graph(gm: torch.fx.GraphModule) -> str:
    """``gm``'s readable code with comments, strides, devices and blank lines removed.

    ``gemma4_flexring`` ops are called with keyword arguments (``causal = True``), and graph class
    names (``GraphModule``, ``<lambda>``, ...) all become ``GraphModule``.
    """
    with _keyword_ring_op_args(gm):
        text = gm.print_readable(print_output=False, include_stride=False, include_device=False, colored=False)
    lines = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        code = re.sub(r"^(\s*)class [^(]*\(torch\.nn\.Module\):", r"\1class GraphModule(torch.nn.Module):", line.rstrip())
        lines.append(code)
    return "\n".join(lines) + "\n"


def ring_op_calls(gm: torch.fx.GraphModule) -> list[str]:
    """Each call of a ``gemma4_flexring`` op in ``gm``, in order, arguments named from the op's
    schema and given as the graph's node names: ``ring_attention(q=transpose, ..., scale=1.0)``."""
    return [format_call(node, lambda n: n.name) for node in gm.graph.nodes if _is_ring_op(node)]


def format_call(node: torch.fx.Node, describe: Callable[[torch.fx.Node], str]) -> str:
    """``op(name=value, ...)`` for a call of a ``torch.ops`` operator, names read from its schema.

    Graph nodes among the values are shown as ``describe(node)``; an argument left out of the
    call shows its schema default.
    """
    values = ", ".join(f"{name}={_format_value(value, describe)}" for name, value in _named_args(node).items())
    return f"{_op_name(node.target)}({values})"


def graph_summary(graphs: Graphs) -> str:
    """What the graphs do, in terms that hold across torch versions (see the module docstring).

    One line for the forward's inputs (``s0`` for a symbolic size, ``f32[1, s0, 4]`` for a tensor),
    then ``forward:`` and ``backward:`` with one call per line; ``getitem`` unpacking is left out.
    """
    inputs = [value_type(node.meta.get("val")) for node in graphs.forward.graph.find_nodes(op="placeholder")]
    lines = [f"inputs: {', '.join(inputs)}"]
    for name, gm in (("forward", graphs.forward), ("backward", graphs.backward)):
        if gm is not None:
            lines.append(f"{name}:")
            lines += [f"  {_describe_call(node)}" for node in gm.graph.nodes
                      if node.op == "call_function" and node.target is not operator.getitem]
    return _renumber_symbols("\n".join(lines)) + "\n"


def compile_batches(fn: Callable[..., Any], batches: Iterable[Batch], dynamic: bool | None = True) -> list[Compile]:
    """Compile ``fn`` once with ``fullgraph=True`` and run it on every batch, forward and backward.

    Each batch runs on detached copies of its tensors (``requires_grad`` kept); when an output
    requires grad, a backward follows through ``torch.autograd.grad``, so no ``.grad`` field
    changes. Compilation is fresh and independent of earlier ones: nothing compiled before is
    reused and nothing is reset. Run under ``torch.no_grad()`` for forward (inference) graphs only.

    Args:
        fn: a function or ``nn.Module``.
        batches: ``(args, kwargs)`` per call; vary lengths and metadata to see what recompiles.
        dynamic: passed to ``torch.compile`` (default True: sizes appear as symbols).

    Returns:
        One ``Compile`` per compile, in order: the first, then one per batch that recompiled.

    Raises:
        torch._dynamo.exc.Unsupported: ``fn`` has a graph break.
        RuntimeError: the first batch compiled nothing.
    """
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    captured: dict[str, torch.fx.GraphModule] = {}

    def keep(kind: str):
        def compiler(gm: torch.fx.GraphModule, example_inputs):
            captured[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))
    fresh = _fresh_function(fn)
    compiled = torch.compile(fresh, backend=backend, fullgraph=True, dynamic=dynamic)
    compiles: list[Compile] = []
    with capture_guards() as guards:
        for index, (args, kwargs) in enumerate(batches):
            captured.clear()
            _run(compiled, args, kwargs)
            # fullgraph=True: one frame, so a call compiles at most once; its backward compiles
            # on the backward that follows, never later.
            for record in compiles_of(fresh.__name__)[len(compiles):]:
                if "forward" not in captured:
                    raise RuntimeError(f"compile_batches: compile {record.compile_id} produced no graph")
                graphs = Graphs(captured["forward"], captured.get("backward"))
                compiles.append(Compile(record.compile_id, index, record.reason, guards.get(record.compile_id, []),
                                        graphs))
            if not compiles:
                raise RuntimeError("compile_batches: nothing was compiled")
    return compiles


def compiled_graphs(fn: Callable[..., Any], *args: Any, dynamic: bool | None = True, **kwargs: Any) -> Graphs:
    """The AOT forward and backward graphs of ``fn(*args, **kwargs)`` compiled with ``fullgraph=True``.

    ``compile_batches`` with one batch: fresh compile, the caller's tensors untouched.
    """
    return compile_batches(fn, [(args, kwargs)], dynamic)[0].graphs


def _fresh_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A function calling ``fn`` whose code object dynamo has never seen.

    Dynamo keeps compiled code per code object and automatic-dynamic sizes per code location
    (file, line, name): a copy of the code under a new name compiles fresh, independent of earlier
    compiles, without resetting anything the caller compiled. Its name also picks out its compiles
    in dynamo's compilation metrics.
    """
    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    name = f"compiled_graphs_{next(_compiles)}"
    return types.FunctionType(call.__code__.replace(co_name=name, co_qualname=name), call.__globals__, name,
                              None, call.__closure__)


def _run(compiled: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """One forward of ``compiled`` on fresh leaves, and a backward when an output requires grad."""
    # Fresh leaves: the caller's tensors keep their .grad, and tensors dynamo saw in an earlier
    # compile (which would change how their sizes are named) are not reused.
    args, kwargs = torch.utils._pytree.tree_map_only(
        Tensor, lambda t: t.detach().clone().requires_grad_(t.requires_grad), (args, kwargs))
    out = compiled(*args, **kwargs)
    outputs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
    leaves = _autograd_leaves(outputs)
    if leaves:
        torch.autograd.grad(outputs, leaves, [torch.ones_like(t) for t in outputs], allow_unused=True)


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


def _named_args(node: torch.fx.Node) -> dict[str, Any]:
    """Every argument of a ``torch.ops`` operator call by its schema name, defaults filled in."""
    named = {}
    for i, argument in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            named[argument.name] = node.args[i]
        elif argument.name in node.kwargs:
            named[argument.name] = node.kwargs[argument.name]
        else:
            named[argument.name] = argument.default_value
    return named


@contextlib.contextmanager
def _keyword_ring_op_args(gm: torch.fx.GraphModule) -> Iterator[None]:
    """While active, ``gm``'s ring op nodes pass every argument by keyword (for printing only:
    the code ``gm`` runs is generated at compile time and does not change)."""
    nodes = [node for node in gm.graph.nodes if _is_ring_op(node)]
    saved = [(node.args, node.kwargs) for node in nodes]
    try:
        for node in nodes:
            node.args, node.kwargs = (), _named_args(node)
        yield
    finally:
        for node, (args, kwargs) in zip(nodes, saved):
            node.args, node.kwargs = args, kwargs


def _is_ring_op(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
        and node.target.namespace == OP_NAMESPACE


def _op_name(target: Any) -> str:
    """``transpose`` for ``torch.ops.aten.transpose.int``; a plain callable's ``__name__``."""
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    return getattr(target, "__name__", str(target))


def _format_value(value: Any, describe: Callable[[torch.fx.Node], str]) -> str:
    if isinstance(value, torch.fx.Node):
        return describe(value)
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(_format_value(v, describe) for v in value)}]"
    return repr(value)


def _describe_call(node: torch.fx.Node) -> str:
    """A ring op call with named arguments; any other op by name alone."""
    return format_call(node, _describe_value) if _is_ring_op(node) else _op_name(node.target)


def _describe_value(node: torch.fx.Node) -> str:
    """A node by what it is, not by its numbered name: an input by its type, an op result by the
    op's name (``transpose``), an unpacked result as ``ring_attention[1]``."""
    if node.op == "placeholder":
        return value_type(node.meta.get("val"))
    if node.target is operator.getitem:
        source, index = node.args
        return f"{_describe_value(source)}[{index}]"
    return _op_name(node.target)


def value_type(value: Any) -> str:
    """``f32[1, s0, 4]`` for a (fake) tensor, the expression for a symbolic size, else ``repr``."""
    if isinstance(value, Tensor):
        return f"{dtype_abbrs[value.dtype]}[{', '.join(str(d) for d in value.shape)}]"
    if isinstance(value, torch.SymInt):
        return str(value)
    return repr(value)


def _renumber_symbols(text: str) -> str:
    """Size symbols renamed ``s0, s1, ...`` in order of first appearance (torch numbers them freely)."""
    names: dict[str, str] = {}
    return re.sub(r"\bs\d+\b", lambda m: names.setdefault(m[0], f"s{len(names)}"), text)
