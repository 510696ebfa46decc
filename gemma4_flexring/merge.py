"""Exact merge of partial attention results through their log-sum-exp.

Numerics: the merged LSE and the merge weights are kept in float64 whatever the inputs' dtype.
A weight ``exp(lse_chunk - lse_merged)`` multiplies every element of a row of ``out``, so its
rounding error is the same relative error across the whole head dim; the backward's row sum
``dO . O`` then adds those errors up instead of averaging them out. Merged in float32, dq at 4
ranks was 2.5x one device's error against a float64 reference; in float64, the ring is within
the one-device error (see tests/test_numerics.py). The LSE is [B, H, S]: float64 costs nothing.
``out`` accumulates in float32 (float64 for float64 inputs), where its rounding errors are
independent per element, as on one device.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The merged LSE's dtype, for every input dtype (the forward op returns it; the backward takes it).
LSE_DTYPE = torch.float64


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the merged LSE the forward op returns for inputs of ``dtype``: float64 always."""
    return LSE_DTYPE


def out_accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """``out`` accumulates in float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """Fold one chunk's result into the running one, in place.

    Shapes: ``acc_out``/``out`` [B, H, S, D], ``acc_lse``/``lse`` [B, H, S] (natural log,
    -inf for a row with no key). ``acc_lse`` is float64 (``LSE_DTYPE``); ``lse`` may be any
    float dtype. ``acc_*`` may be views into larger accumulators.
    """
    lse = lse.to(acc_lse.dtype)
    new_lse = torch.logaddexp(acc_lse, lse)
    alive = new_lse > float("-inf")
    zero = acc_lse.new_zeros(())
    old_weight = torch.where(alive, torch.exp(acc_lse - new_lse), zero).to(acc_out.dtype)
    new_weight = torch.where(alive, torch.exp(lse - new_lse), zero).to(acc_out.dtype)
    acc_out.mul_(old_weight.unsqueeze(-1)).addcmul_(out, new_weight.unsqueeze(-1))  # no tile-sized temporary
    acc_lse.copy_(new_lse)
