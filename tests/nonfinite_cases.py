"""Workers for the non-finite tests: K and V poisoned with NaN and Inf at chosen keys."""

from __future__ import annotations

import torch

from ring_cases import Case, make_info, make_tensors, run_case

POISON = (float("nan"), float("inf"), float("-inf"))


def poison(t: torch.Tensor, keys: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """``t`` [B, H, S, D] with NaN, +Inf and -Inf (cycling along D) at keys [B, S] (bool)."""
    values = torch.tensor(POISON, dtype=t.dtype).roll(shift).repeat(t.shape[-1])[: t.shape[-1]]
    return torch.where(keys[:, None, :, None], values, t)


def padding_keys(case: Case) -> torch.Tensor:
    return make_info(case.info, case.batch, case.seq_len).padding


def run_poisoned(rank: int, world_size: int, cases: list[Case], layout_kind: str, where: str) -> list:
    """Per case, this rank's (out, dq, dk, dv) with K and V poisoned at ``where``: "none",
    "padding" (every padding key) or "key:<j>" (global key j in every batch row)."""
    results = []
    for case in cases:
        q, k, v, grad = make_tensors(case)
        if where == "padding":
            keys = padding_keys(case)
        elif where.startswith("key:"):
            keys = torch.zeros(case.batch, case.seq_len, dtype=torch.bool)
            keys[:, int(where[4:])] = True
        else:
            keys = None
        if keys is not None:
            k, v = poison(k, keys), poison(v, keys, shift=1)
        results.append(run_case(rank, world_size, case, layout_kind, (q, k, v, grad)))
    return results
