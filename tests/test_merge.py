"""The LSE merge against attention over all keys at once, and the row groups whose results it
merges together."""

from __future__ import annotations

import torch

from gemma4_flexring.merge import LSE_DTYPE, merge_
from gemma4_flexring.ring import GROUP_CALLS, GROUP_ROWS, row_groups
from gemma4_flexring.planning.tiles import Tile, TileKind


def _attend(q, k, v, allowed):
    """Dense attention [B, H, S, D] and natural LSE [B, H, S] (-inf, out 0 where no key is allowed)."""
    scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.where(allowed, (scores - lse.unsqueeze(-1)).exp(), 0.0)
    return probs @ v, lse


def test_merging_parts_at_once_equals_attention_over_all_keys():
    """Three key chunks merged in two calls (one part, then two at once) give attention over all
    keys, with rows that no chunk, or only some chunks, let through."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 10, 4, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 3, 24, 4, generator=g, dtype=torch.float64) for _ in range(2))
    allowed = torch.rand(2, 3, 10, 24, generator=g) < 0.5
    allowed[:, :, 0] = False  # a row with no key anywhere
    allowed[:, :, 1, 8:] = False  # a row with keys in the first chunk only
    want_out, want_lse = _attend(q, k, v, allowed)
    acc_out, acc_lse = torch.zeros_like(q), torch.full(q.shape[:-1], float("-inf"), dtype=LSE_DTYPE)
    chunks = [slice(0, 8), slice(8, 16), slice(16, 24)]
    parts = [_attend(q, k[:, :, c], v[:, :, c], allowed[..., c]) for c in chunks]
    merge_(acc_out, acc_lse, parts[:1], fresh=True)
    merge_(acc_out, acc_lse, parts[1:])
    torch.testing.assert_close(acc_out, want_out, rtol=1e-12, atol=1e-12)
    assert torch.equal(acc_lse.isinf(), want_lse.isinf())
    torch.testing.assert_close(acc_lse[~want_lse.isinf()], want_lse[~want_lse.isinf()], rtol=1e-12, atol=0)
    assert (acc_out[:, :, 0] == 0).all()


def test_a_fresh_merge_writes_what_merging_into_empty_rows_computes():
    """``fresh=True`` skips the empty running result's zero term: bitwise the same rows, from one
    part or several, bfloat16 parts with float32 LSEs included (promoted as the running LSE's)."""
    g = torch.Generator().manual_seed(1)
    parts = [(torch.randn(1, 2, 8, 4, generator=g).bfloat16(), torch.randn(1, 2, 8, generator=g)) for _ in range(3)]
    parts[1][1][0, 0, 3] = float("-inf")  # a row one part lets through nothing
    for _, lse in parts:
        lse[0, 1, 2] = float("-inf")  # a row no part lets through
    for n in (1, 2, 3):
        merged = []
        for fresh in (False, True):
            acc_out, acc_lse = torch.zeros(1, 2, 8, 4), torch.full((1, 2, 8), float("-inf"), dtype=LSE_DTYPE)
            merge_(acc_out, acc_lse, parts[:n], fresh=fresh)
            merged.append((acc_out, acc_lse))
        (out, lse), (fresh_out, fresh_lse) = merged
        assert torch.equal(fresh_out, out) and torch.equal(fresh_lse, lse)
        assert (fresh_out[0, 1, 2] == 0).all() and fresh_lse[0, 1, 2] == float("-inf")


def test_row_groups_keep_order_and_group_short_calls_on_the_same_rows():
    def call(q0, q1, k0):
        return Tile(slice(q0, q1), slice(k0, k0 + 8), TileKind.FULL)

    long_rows = GROUP_ROWS + 1
    calls = ([call(0, 256, k) for k in range(0, 48, 8)]  # six short calls on the same rows
             + [call(0, 128, 0), call(256, 256 + long_rows, 0), call(256, 256 + long_rows, 8)])
    groups = list(row_groups(calls))
    assert [c for g in groups for c in g] == calls
    assert [len(g) for g in groups] == [GROUP_CALLS, 6 - GROUP_CALLS, 1, 1, 1]
    assert all(c.q_rows == g[0].q_rows for g in groups for c in g)
