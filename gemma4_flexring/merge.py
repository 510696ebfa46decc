"""Exact merge of partial attention results through their log-sum-exp."""

from __future__ import annotations

import torch
from torch import Tensor


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merge in float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """Fold one chunk's result into the running one, in place.

    Shapes: ``acc_out``/``out`` [B, H, S, D], ``acc_lse``/``lse`` [B, H, S] (natural log,
    -inf for a row with no key). ``acc_*`` may be views into larger accumulators.
    """
    new_lse = torch.logaddexp(acc_lse, lse.to(acc_lse.dtype))
    alive = new_lse > float("-inf")
    zero = acc_lse.new_zeros(())
    old_weight = torch.where(alive, torch.exp(acc_lse - new_lse), zero)
    new_weight = torch.where(alive, torch.exp(lse - new_lse), zero)
    acc_out.mul_(old_weight.unsqueeze(-1)).addcmul_(out, new_weight.unsqueeze(-1))  # no tile-sized temporary
    acc_lse.copy_(new_lse)
