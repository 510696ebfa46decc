"""FlexAttention's higher-order ops as each supported torch calls them: the only place that
knows how the versions differ.

The flex kernel calls the HOPs directly (the forward for its LSE, the backward fed the ring's
merged out and LSE), so it depends on their calling conventions, which changed between releases:

- **torch >= 2.12**: ``flex_attention_backward`` accepts ``joint_graph=None`` and derives the
  joint graph of the score_mod itself, both eagerly and when dynamo traces a direct call (dynamo
  speculates the Python score_mod and mask_mod into subgraphs).
- **torch 2.11**: the eager backward calls the ``joint_graph`` it is given (``None`` fails with
  "'NoneType' object is not callable"), so ``backward`` builds it here with flex's own
  ``create_fw_bw_graph``. Dynamo cannot trace a direct call of the backward HOP at all: it accepts
  only pre-traced graph modules (the ones AOTAutograd produces from ``flex_attention``'s own
  autograd), not Python callables such as the mask_mods the planner builds. On 2.11 the kernel
  therefore compiles its forward only and runs the backward HOP eagerly: exact, but flex's dense
  math path (``BACKWARD_COMPILES``).

The forward HOP's calling convention is the same on every supported version. Both HOPs keep
base-2 statistics (the Triton and eager dense backends); the ring merges natural logs:
``from_flex_lse`` / ``to_flex_lse`` are the only conversions.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

LN_2 = math.log(2.0)
LOG2_E = 1.0 / LN_2


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


# Whether dynamo can trace ``backward`` (torch >= 2.12; see the module docstring).
BACKWARD_COMPILES = _torch_version() >= (2, 12)


def from_flex_lse(lse_base2: Tensor) -> Tensor:
    """Flex's base-2 LSE in the ring's convention, the natural log."""
    return lse_base2 * LN_2


def to_flex_lse(lse: Tensor) -> Tensor:
    """The ring's natural-log LSE as flex's backward reads it: base 2."""
    return lse * LOG2_E


def identity_score(score, b, h, q_idx, kv_idx):
    return score


def forward(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float,
            options: dict) -> tuple[Tensor, Tensor]:
    """The forward HOP, as ``flex_attention`` calls it when compiled (GQA is native to it).

    q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> (out [B, Hq, Sq, D], lse [B, Hq, Sq] natural log).
    ``options`` is the full option set the HOP reads (``_apply_kernel_options``'s result)."""
    if torch.compiler.is_dynamo_compiling():
        for t in (q, k, v):  # as flex_attention does: heads and head dim are static
            torch._dynamo.mark_static(t, -3)
            torch._dynamo.mark_static(t, -1)
    out, lse_base2, _ = torch.ops.higher_order.flex_attention(
        q, k, v, identity_score, block_mask.as_tuple(), scale, options)
    return out, from_flex_lse(lse_base2)


@lru_cache(maxsize=None)
def _identity_joint_graph(dtype: torch.dtype, device: torch.device):
    """The joint (score, grad) graph of ``identity_score``, as torch 2.12+ derives it itself."""
    from torch._higher_order_ops.flex_attention import create_fw_bw_graph

    score = torch.zeros((), dtype=dtype, device=device, requires_grad=True)
    indices = tuple(torch.zeros((), dtype=torch.int, device=device) for _ in range(4))
    return create_fw_bw_graph(identity_score, (score, *indices), ())[1]


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             block_mask: BlockMask, scale: float, options: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one call, given the *merged* out and natural-log lse of its rows.

    Shapes as ``forward``; lse [B, Hq, Sq]. Traceable by dynamo only where ``BACKWARD_COMPILES``."""
    joint_graph = None if BACKWARD_COMPILES else _identity_joint_graph(q.dtype, q.device)
    dq, dk, dv, _ = torch.ops.higher_order.flex_attention_backward(
        q, k, v, out, to_flex_lse(lse), grad_out, None, identity_score, joint_graph,
        block_mask.as_tuple(), scale, options, (), ())
    return dq, dk, dv
