"""Input checks that run before the first exchange.

Local problems are collected, not raised, so that every rank reaches the agreement step: ranks
then compare a small signature of their inputs (shapes, dtype, mask, layout, a fingerprint of
the metadata) and all of them raise the same clear error, instead of one rank raising while
the others wait in the ring forever.
"""

from __future__ import annotations

import math
import struct
import threading
from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import all_gather_ints, all_gather_object
from .kernels import kernel_problem
from .layout import LAYOUTS
from .planning.metadata import Metadata, digest_words
from .stats import record_agreement

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SIGNATURE_FIELDS = ("failed", "batch", "q_heads", "kv_heads", "local_len", "head_dim", "dtype",
                     "causal", "sliding_window", "block_bidirectional",
                     "layout (positions)", "layout (positions)",  # a 128-bit digest in two words
                     "scale",
                     "metadata (document_ids, block_ids, padding)",
                     "metadata (document_ids, block_ids, padding)",  # a 128-bit digest in two words
                     "FlexMask (factory name and tensors)",
                     "FlexMask (factory name and tensors)")  # a 128-bit digest in two words, 0 for a MaskSpec

# What most often makes ranks disagree on a field whose values are digests, said with the digests.
_LIKELY_CAUSES = {
    "metadata": "every rank must pass the whole batch's metadata; ranks of one CP group given different "
                "batches (a sampler or data loader that splits the batch over them) disagree here",
    "layout (positions)": "every rank must pass the same layout; a balanced one must be built from the same batch",
    "FlexMask": "every rank must pass the same mask: a FlexMask with the same factory name and tensors of equal "
                "content, or the same MaskSpec",
    "batch content": "every rank of the CP group must pass the same whole-sequence batch; a sampler or data "
                     "loader that gives the ranks of one CP group different batches (as data-parallel ranks get) "
                     "causes this",
}


def local_problems(q: Tensor, k: Tensor, v: Tensor, info: tuple[Tensor, ...], sliding_window: int | None,
                   layout: Tensor, world_size: int, scale: float | None, kernel: str = "",
                   mask: tuple[str, Sequence[Tensor], Tensor | None] = ("", (), None)) -> list[str]:
    """Everything wrong with one rank's arguments, as readable sentences (empty when fine);
    ``mask`` is a FlexMask's (op_name, tensors, generation), ("", (), None) for a MaskSpec."""
    problems = []
    for name, t in zip("qkv", (q, k, v)):
        if t.dim() != 4:
            problems.append(f"{name} must be [B, H, S_local, D] (4-D), got shape {tuple(t.shape)}")
    if problems:
        return problems
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        problems.append(f"q, k, v must share one dtype of {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        problems.append(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    elif (problem := kernel_problem(kernel, q.device)) is not None:
        problems.append(problem)
    if k.shape != v.shape:
        problems.append(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, q_heads, local_len, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, local_len, head_dim):
        problems.append(f"k must be [B={batch}, Hkv, S_local={local_len}, D={head_dim}] like q, got {tuple(k.shape)}")
    elif k.shape[1] < 1 or q_heads % k.shape[1]:
        problems.append(f"query heads ({q_heads}) must be a multiple of key/value heads ({k.shape[1]})")
    if local_len < 1:
        problems.append("the local sequence is empty")
    if head_dim < 1:
        problems.append("the head dim (q.shape[-1]) is 0")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        problems.append(f"scale must be a positive finite number, got {scale}")
    if sliding_window is not None and sliding_window < 1:
        problems.append(f"sliding_window must be None or positive, got {sliding_window}")
    # Whether it is a permutation is checked when its segments are found (``PlanCache.layout``).
    if layout.dim() != 1 or layout.dtype != torch.int64 or layout.shape[0] != local_len * world_size:
        problems.append(f"the layout table must be int64 [S={local_len * world_size}] (rank-major global "
                        f"positions), got {layout.dtype} {tuple(layout.shape)}")
    for name, t in zip(("document_ids", "block_ids", "padding"), info):
        if tuple(t.shape) != (batch, local_len * world_size):
            problems.append(f"SequenceInfo.{name} must be the whole sequence [B={batch}, "
                            f"S={local_len * world_size}], got {tuple(t.shape)}")
        if t.device != q.device:
            problems.append(f"SequenceInfo.{name} is on {t.device}, q on {q.device}")
    return problems + flex_mask_problems(*mask, q.device)


def flex_mask_problems(op_name: str, tensors: Sequence[Tensor], generation: Tensor | None,
                       device: torch.device) -> list[str]:
    """What is wrong with a FlexMask's op arguments (none for a MaskSpec: ``op_name`` "")."""
    if not op_name:
        return [] if not tensors else ["mask_tensors are given without a FlexMask's mask_name"]
    problems = [f"FlexMask tensor {n} is on {t.device}, q on {device}" for n, t in enumerate(tensors)
                if t.device != device]
    if generation is None or generation.dim() != 0 or generation.dtype != torch.int64:
        problems.append("a FlexMask's mask_generation must be an int64 scalar tensor (FlexMask.generation)")
    return problems


def signature(q: Tensor, k: Tensor, meta: Metadata, causal: bool, sliding_window: int | None,
              block_bidirectional: bool, layout: bytes, scale: float, flex_mask: bytes | None = None) -> list[int]:
    """Integers every rank must agree on (see ``_SIGNATURE_FIELDS``; the first, 0: not failed);
    ``layout`` is the layout table's 16-byte digest, ``flex_mask`` a FlexMask's (None: a MaskSpec)."""
    dtype = _DTYPES.index(q.dtype)
    scale_bits = struct.unpack("<q", struct.pack("<d", float(scale)))[0]
    return [0, *q.shape[:2], k.shape[1], *q.shape[2:], dtype, int(causal),
            -1 if sliding_window is None else sliding_window, int(block_bidirectional),
            *digest_words(layout), scale_bits, *digest_words(meta.digest),
            *(digest_words(flex_mask) if flex_mask is not None else (0, 0))]


def _readable(field: str, value: int) -> object:
    """A signature entry as the user wrote it."""
    if field == "dtype":
        return _DTYPES[value]
    if field == "scale":
        return struct.unpack("<d", struct.pack("<q", value))[0]
    if field == "sliding_window":
        return None if value == -1 else value
    if field in ("causal", "block_bidirectional"):
        return bool(value)
    if field == "layout kind":
        return LAYOUTS[value]
    if field.startswith(("metadata", "layout (positions)", "batch content", "FlexMask")):
        return f"digest {value & (2**64 - 1):016x}..."
    return value


def check_inputs(problems: list[str], group: dist.ProcessGroup | None, sign: Callable[[], list[int]],
                 fields: tuple[str, ...] = _SIGNATURE_FIELDS, caller: str = "ring_attention") -> None:
    """Raise the same ValueError on every rank when any rank's inputs are bad or ranks disagree.

    ``sign`` gives this rank's values of ``fields`` (the first one: 1 when this rank failed); it is
    computed only when there are ranks to compare. Every rank of ``group`` must call this with
    the same ``fields``.
    """
    if group is None or group.size() == 1:
        if problems:
            raise ValueError(f"{caller}: " + "; ".join(problems))
        return
    record_agreement()
    rows = all_gather_ints(group, [1] + [0] * (len(fields) - 1) if problems else sign())
    if not any(r[0] for r in rows) and all(r == rows[0] for r in rows):
        return
    messages = all_gather_object(group, problems)
    lines = [f"rank {r}: {'; '.join(m)}" for r, m in enumerate(messages) if m]
    if not lines:
        for i, field in enumerate(fields):
            values = [r[i] for r in rows]
            if len(set(values)) > 1 and not any(field in line for line in lines):
                shown = ", ".join(f"rank {r}: {_readable(field, v)}" for r, v in enumerate(values))
                cause = next((c for prefix, c in _LIKELY_CAUSES.items() if field.startswith(prefix)), None)
                lines.append(f"ranks disagree on {field}: {shown}" + (f" ({cause})" if cause else ""))
    raise ValueError(f"{caller}: bad input, no exchange was started:\n  " + "\n  ".join(lines))


Problem = tuple[type[Exception], str]  # (exception type when alone, sentence)

AGREED_CAPACITY = 256
_AGREED: OrderedDict[Hashable, None] = OrderedDict()
_AGREED_LOCK = threading.Lock()


def check_inputs_once(key: Hashable, problems: list[str], group: dist.ProcessGroup | None,
                      sign: Callable[[], list[int]]) -> None:
    """``check_inputs``, skipped when this rank already agreed with the others on ``key``.

    ``key`` must name everything the agreement covers: the group, the batch's generation and this
    rank's signature. Every layer of one kind then agrees once per batch, not once per call (an
    all_gather is a host synchronisation on GPUs). The price: a rank whose later call differs
    from an agreed one while the others' calls match theirs is caught by the process group's
    timeout, not by this check.
    """
    with _AGREED_LOCK:
        if not problems and key in _AGREED:
            _AGREED.move_to_end(key)
            return
    check_inputs(problems, group, sign)
    with _AGREED_LOCK:
        _AGREED[key] = None
        while len(_AGREED) > AGREED_CAPACITY:
            _AGREED.popitem(last=False)


def agree(problems: list[Problem], group: dist.ProcessGroup | None, sign: Callable[[], list[int]],
          fields: tuple[str, ...], caller: str) -> None:
    """``check_inputs`` for checks made outside the op, which every rank of ``group`` runs.

    Alone, or while tracing (where no collective may run), the first problem raises here with
    its own type; with other ranks, every rank raises the same ValueError.
    """
    if group is None or group.size() == 1 or torch.compiler.is_compiling():
        if problems:
            kind, message = problems[0]
            raise kind(f"{caller}: {message}")
        return
    check_inputs([message for _, message in problems], group, sign, fields, caller)


def fail_together(problems: list[Problem], group: dist.ProcessGroup | None) -> None:
    """Raise ``problems`` found before the op (argument types, devices, layouts) on every rank.

    This rank joins, as a failed rank, the agreement that the other ranks' op calls hold before
    their first exchange, so that all of them raise the same ValueError instead of waiting.
    """
    agree(problems, group, lambda: [], _SIGNATURE_FIELDS, "ring_attention")
