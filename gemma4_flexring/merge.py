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

from functools import reduce
from typing import Sequence

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


def merge_(acc_out: Tensor, acc_lse: Tensor, parts: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Fold partial results of the same rows into the running one, in place, all at once.

    Shapes: ``acc_out`` [B, H, S, D], ``acc_lse`` [B, H, S] (natural log, -inf for a row with no
    key); ``parts`` [(out [B, H, S, D], lse [B, H, S]), ...]. ``acc_lse`` is float64
    (``LSE_DTYPE``); a part's lse may be any float dtype. ``acc_*`` may be views into larger
    accumulators.
    """
    lses = torch.stack([acc_lse, *(lse for _, lse in parts)])  # promoted to acc_lse's dtype: [n + 1, B, H, S]
    new_lse = reduce(torch.logaddexp, lses.unbind(0))  # measured cheaper than logsumexp over the stack
    # A row with no key anywhere yet has new_lse = -inf: its weights are 0, not exp(-inf - -inf) = NaN
    # (a NaN or +inf lse from non-finite inputs keeps its NaN weights).
    weights = lses.sub_(new_lse).exp_().masked_fill_(new_lse == float("-inf"), 0.0).to(acc_out.dtype).unsqueeze_(-1)
    acc_out.mul_(weights[0])
    for (out, _), weight in zip(parts, weights[1:]):
        acc_out.addcmul_(out, weight)  # no part-sized temporary
    acc_lse.copy_(new_lse)
