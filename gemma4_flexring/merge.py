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


def out_accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """``out`` accumulates in float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_(acc_out: Tensor, acc_lse: Tensor, parts: Sequence[tuple[Tensor, Tensor]], fresh: bool = False) -> None:
    """Fold partial results of the same rows into the running one, in place, all at once.

    Shapes: ``acc_out`` [B, H, S, D], ``acc_lse`` [B, H, S] (natural log, -inf for a row with no
    key); ``parts`` [(out [B, H, S, D], lse [B, H, S]), ...]. ``acc_lse`` is float64
    (``LSE_DTYPE``); a part's lse may be any float dtype. ``acc_*`` may be views into larger
    accumulators. ``fresh``: no part was merged into these rows yet (``acc_lse`` -inf, ``acc_out``
    0); they are written without being read, as the same sums without the running result's
    zero term (one part alone is copied).
    """
    if fresh and len(parts) == 1:  # the part itself: its weight exp(lse - lse) is 1, 0 where lse is -inf
        out, lse = parts[0]
        acc_out.copy_(out).masked_fill_((lse == float("-inf")).unsqueeze(-1), 0.0)
        acc_lse.copy_(lse)
        return
    running = () if fresh else (acc_lse,)
    lses = torch.stack([*running, *(lse for _, lse in parts)]).to(acc_lse.dtype)  # [n (+ 1), B, H, S]
    each = lses.unbind(0)
    new_lse = reduce(torch.logaddexp, each) if len(each) > 1 else each[0].clone()  # cheaper than logsumexp
    # A row with no key anywhere yet has new_lse = -inf: its weights are 0, not exp(-inf - -inf) = NaN
    # (a NaN or +inf lse from non-finite inputs keeps its NaN weights).
    weights = lses.sub_(new_lse).exp_().masked_fill_(new_lse == float("-inf"), 0.0).to(acc_out.dtype).unsqueeze_(-1)
    outs = [out for out, _ in parts]
    if fresh:  # weights and outs both start with the first part's
        torch.mul(outs.pop(0), weights[0], out=acc_out)
    else:  # weights start with the running result's
        acc_out.mul_(weights[0])
    for out, weight in zip(outs, weights[1:]):
        acc_out.addcmul_(out, weight)  # no part-sized temporary
    acc_lse.copy_(new_lse)
