"""``FlexMask``: any FlexAttention-style ``mask_mod`` over global positions, as a layer's mask.

A ``FlexMask`` is a *factory* (a module-level function: tensors in, ``mask_mod`` out) and the
whole-sequence tensors it takes. The op receives the factory by name (``op_name``: the factory's
name and its tensors' keywords) and the tensors as tensors, so under ``torch.compile`` they are
graph inputs, never constants or guards; inside the op the factory is found again by that name
(``resolve_factory``) and called on the tensors once per content (``flex_spec``).

The planner knows nothing of a mask_mod's structure: its block classes are PARTIAL everywhere
(``unknown_classes``, sound), so every block that the metadata (documents, padding) leaves open is
evaluated entry by entry once per content and cached like any plan. A mask_mod that carries
``block_classes(q, k)`` (the presets' do: sound classes from block bounds and summaries, see
``blocks.py``) is classed by it instead, and only its partial blocks are evaluated.

Shape legend: B batch rows, S whole sequence length, Qb / KVb query / key blocks.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .blocks import CLASS_DTYPE, PARTIAL
from .masks import Mask, MaskMod
from .metadata import content_digest

Factory = Callable[..., MaskMod]

_REGISTRY: dict[str, Factory] = {}  # factories named with ``name=`` in this process
_REGISTRY_LOCK = threading.Lock()
_SEPARATOR = "|"  # between the factory's name and its tensors' keywords in ``op_name``


def _new_generation(like: Tensor) -> Tensor:
    """A fresh generation from the custom op (registered by ``ops.py``; called by name, as
    ``info.py`` does, so that this data type sits below the engine)."""
    return torch.ops.gemma4_flexring.new_generation.default(like)


# Run, not traced, under torch.compile (dynamo cannot read a function's ``__qualname__``): the
# factory is a constant of the traced code, and so is its name.
@torch.compiler.assume_constant_result
def factory_name(factory: Factory, name: str | None) -> str:
    """The name that identifies ``factory`` across ranks and compiled graphs: ``name`` when given
    (and the factory is registered under it in this process), else ``module.qualname``.

    Raises:
        TypeError: ``factory`` is not callable, or ``name`` is not a str.
        ValueError: a lambda or nested function without ``name=`` (no other process can find it by
            its qualified name), or a ``name`` with ``|`` in it.
    """
    if not callable(factory):
        raise TypeError(f"FlexMask: the factory must be a function, got {type(factory).__name__}")
    if name is not None:
        if not isinstance(name, str) or not name or _SEPARATOR in name:
            raise (TypeError if not isinstance(name, str) else ValueError)(
                f"FlexMask: name must be a non-empty str without {_SEPARATOR!r}, got {name!r}")
        with _REGISTRY_LOCK:
            _REGISTRY[name] = factory
        return name
    qualname = getattr(factory, "__qualname__", None)
    module = getattr(factory, "__module__", None)
    if qualname is None or module is None or "<lambda>" in qualname or "<locals>" in qualname:
        raise ValueError(
            f"FlexMask: the factory {qualname or factory!r} has no name other processes and compiled graphs can find "
            "it by: define it at module level (def prefix_lm(prefix): ...), or pass name='...' (the same name, for "
            "the same function, on every rank)")
    return f"{module}.{qualname}"


class FlexMask:
    """A layer's mask from a FlexAttention-style ``mask_mod`` over global positions.

    ``factory(**tensors)`` returns ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (``b`` the batch
    row, ``q_idx`` / ``kv_idx`` global positions, all int64 tensors that broadcast; it must
    broadcast too, as flex's mask_mods do). The ring computes attention under that mask, ANDed
    with the ``SequenceInfo``'s documents and padding, exactly; its image blocks are ignored.
    Accepted wherever a ``MaskSpec`` is (``ring_attention``, ``plan_ahead``,
    ``Layout.balanced(masks=...)``).

    Ranks must pass equal masks: the same factory name and tensors of equal content (checked
    before any exchange). Build one per batch when its tensors change; like ``SequenceInfo``,
    each instance gets a fresh ``generation`` so its content is hashed once, not per layer.

    Args:
        factory: a module-level function, found in every process (and in compiled and exported
            graphs) by its qualified name; a lambda or nested function needs ``name``.
        name: an explicit name for the factory (``|`` excluded); every rank must give the same
            name to the same function, which is then found in this process's registry.
        **tensors: the whole-sequence tensors the factory takes, the same on every rank; moved
            to the queries' device by ``ring_attention``.

    Raises:
        TypeError: a factory that is not callable, or a keyword that is not a Tensor (a
            ``score_mod`` among them: score mods are not supported, only masks).
        ValueError: a factory without a findable name.

    The mask_mod may not read ``h``: one plan serves every head, so a per-head mask is refused
    (inside the op, on every rank). A ``score_mod`` (five arguments) is refused too.

    The planner evaluates the mask_mod inside every block that documents and padding leave open
    (once per content). A mask_mod may carry ``block_classes(q_blocks, k_blocks) -> int8 [B or 1,
    Qb, KVb]`` (0 empty, 1 partial, 2 full; ``planning/blocks.py``), as the presets' do: the
    planner then evaluates partial blocks only, and trusts it (an unsound one gives wrong results).
    """

    __slots__ = ("factory", "name", "tensors", "generation")

    def __init__(self, factory: Factory, *, name: str | None = None, **tensors: Tensor) -> None:
        resolved = factory_name(factory, name)
        bad = {k: type(v).__name__ for k, v in tensors.items() if not isinstance(v, Tensor)}
        if bad:
            score = " (score mods are not supported: a FlexMask is a mask_mod's factory)" if "score_mod" in bad else ""
            raise TypeError(f"FlexMask: the factory's arguments must be Tensors, got {bad}{score}")
        anchor = next(iter(tensors.values()), None)
        _set(self, factory=factory, name=resolved, tensors=dict(tensors),
             generation=_new_generation(torch.zeros(()) if anchor is None else anchor))

    @classmethod
    def of_batch(cls, generation: Tensor, factory: Factory, name: str | None = None, **tensors: Tensor) -> "FlexMask":
        """A FlexMask whose tensors all belong to an immutable batch object with ``generation`` (a
        ``SequenceInfo``'s): it takes that generation, so every layer's mask built from the
        batch is described once, not once per layer (the stamp check still sees a mutation)."""
        mask = cls.__new__(cls)
        _set(mask, factory=factory, name=factory_name(factory, name), tensors=dict(tensors), generation=generation)
        return mask

    @property
    def op_name(self) -> str:
        """What the op receives: the factory's name and its tensors' keywords, ``name|k1,k2``."""
        return self.name + _SEPARATOR + ",".join(self.tensors)

    def op_tensors(self, device: torch.device) -> list[Tensor]:
        """The factory's tensors in ``op_name``'s keyword order, on ``device``."""
        return [t.to(device) for t in self.tensors.values()]

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"FlexMask is immutable (cannot set {name!r}): build a new FlexMask")

    def __reduce__(self):  # pickled by its factory (by reference) and tensors; a new generation on arrival
        return _rebuild, (self.factory, self.name, self.tensors)

    def __eq__(self, other) -> bool:  # identity: two instances may hold different tensor contents
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(t.shape)}" for k, t in self.tensors.items())
        return f"FlexMask({self.name}{', ' if shapes else ''}{shapes})"


def _rebuild(factory: Factory, name: str, tensors: dict[str, Tensor]) -> FlexMask:
    """An unpickled FlexMask, its factory registered under its name in this process."""
    return FlexMask(factory, name=name, **tensors)


def _set(mask: FlexMask, **values) -> None:
    for key, value in values.items():
        object.__setattr__(mask, key, value)


def split_op_name(op_name: str) -> tuple[str, list[str]]:
    """(factory name, tensor keywords) of an ``op_name``."""
    name, _, keys = op_name.partition(_SEPARATOR)
    return name, [k for k in keys.split(",") if k]


def resolve_factory(name: str) -> Factory:
    """The factory called ``name``: from this process's registry (``name=``), else imported by
    its module-qualified name.

    Raises:
        ValueError: no such factory in this process.
    """
    with _REGISTRY_LOCK:
        found = _REGISTRY.get(name)
    if found is not None:
        return found
    module_name, obj = name, None
    while "." in module_name:
        module_name, _, _ = module_name.rpartition(".")
        try:
            obj = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            for part in name[len(module_name) + 1:].split("."):
                obj = getattr(obj, part)
        except AttributeError:
            obj = None
        break
    if obj is None or not callable(obj):
        raise ValueError(f"FlexMask factory {name!r} cannot be found in this process: a named factory must have "
                         "been given to a FlexMask(..., name=...) here first, a module-level one must be importable")
    return obj


class FlexSpec(NamedTuple):
    """A FlexMask as the planner keys it: its ``op_name`` and its tensors' content digest (equal
    specs, equal masks). ``mask`` (the mask_mod, classes PARTIAL everywhere) and ``per_row``
    (whether the mask_mod reads ``b``) are derived from them and left out of equality."""

    op_name: str
    digest: bytes
    mask: Mask
    per_row: bool

    def __eq__(self, other) -> bool:
        return isinstance(other, FlexSpec) and (self.op_name, self.digest) == (other.op_name, other.digest)

    def __hash__(self) -> int:
        return hash((self.op_name, self.digest))

    def __repr__(self) -> str:
        return f"FlexSpec({split_op_name(self.op_name)[0]}, digest={self.digest.hex()[:16]}...)"


def flex_spec(op_name: str, tensors: list[Tensor]) -> FlexSpec:
    """The planner's view of a FlexMask (its ``op_name`` and ``op_tensors``): the tensors' digest,
    the factory called on them, the mask_mod probed (``probe_mask_mod``), classes from its
    ``block_classes`` when it has one, else PARTIAL everywhere. Reads the tensors (on the CPU, for
    the digest): once per content.

    Raises:
        ValueError: the factory cannot be found or returns no mask_mod, or the mask_mod is refused
            by ``probe_mask_mod``.
    """
    name, keys = split_op_name(op_name)
    if len(keys) != len(tensors):
        raise ValueError(f"FlexMask {name!r}: {len(keys)} keywords for {len(tensors)} tensors")
    mask_mod = resolve_factory(name)(**dict(zip(keys, tensors)))
    device = tensors[0].device if tensors else torch.device("cpu")
    per_row = probe_mask_mod(name, mask_mod, device)
    digest = content_digest((op_name, [tuple(t.shape) for t in tensors]), tensors)
    return FlexSpec(op_name, digest, Mask(mask_mod, getattr(mask_mod, "block_classes", unknown_classes)), per_row)


def planner_spec(mask, device: torch.device):
    """A layer's mask as ``plan_context`` takes it, built afresh (tools and tests; the op goes
    through ``PlanCache.flex``): a ``FlexMask`` as its ``FlexSpec`` (tensors on ``device``), a
    ``MaskSpec`` as it is."""
    return flex_spec(mask.op_name, mask.op_tensors(device)) if isinstance(mask, FlexMask) else mask


def unknown_classes(q, k) -> Tensor:
    """Classes of a mask known only entry by entry: PARTIAL for every block pair (sound), int8
    [1, Qb, KVb]; ``q``, ``k`` are ``Blocks`` or ``Spans``."""
    device = q.bounds()[0].device
    return torch.full((1, q.count, k.count), PARTIAL, dtype=CLASS_DTYPE, device=device)


class _Read(Exception):
    """Raised by ``_Probe`` when a mask_mod computes with the argument it stands for."""


class _Probe(Tensor):
    """An index argument as ``probe_mask_mod`` passes it: any torch operation on it raises ``_Read``."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise _Read


def probe_mask_mod(name: str, mask_mod, device: torch.device) -> bool:
    """Check ``mask_mod`` at (b=0, h=0, q=0, kv=0) and say whether it reads ``b`` (a per-row mask,
    planned for every batch row; one that does not is planned once for all of them).

    Raises:
        ValueError: not a function; a score_mod (five arguments); a mask_mod that reads ``h``
            (per-head masks are not supported: one plan serves every head), fails, or returns
            something else than a bool tensor.
    """
    if not callable(mask_mod):
        raise ValueError(f"FlexMask {name!r}: the factory must return a mask_mod, got {type(mask_mod).__name__}")
    try:
        arity = len(inspect.signature(mask_mod).parameters)
    except (TypeError, ValueError):
        arity = 4
    if arity == 5:
        raise ValueError(f"FlexMask {name!r}: the factory returned a score_mod (score, b, h, q_idx, kv_idx); only "
                         "mask_mods (b, h, q_idx, kv_idx) -> bool are supported, score mods are not")

    def index(probe: bool) -> Tensor:
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return zero.as_subclass(_Probe) if probe else zero

    try:
        mask_mod(index(False), index(True), index(False), index(False))
    except _Read:
        raise ValueError(f"FlexMask {name!r}: its mask_mod reads h, the head index; ring_attention plans one mask "
                         "for every head, so per-head masks are not supported (drop h, or run the heads that "
                         "share a mask as separate calls)") from None
    allowed = mask_mod(*(index(False) for _ in range(4)))
    if not isinstance(allowed, Tensor) or allowed.dtype != torch.bool:
        got = allowed.dtype if isinstance(allowed, Tensor) else type(allowed).__name__
        raise ValueError(f"FlexMask {name!r}: its mask_mod must return a bool tensor, got {got}")
    try:
        mask_mod(index(True), index(False), index(False), index(False))
    except _Read:
        return True
    return False
