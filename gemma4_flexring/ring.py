"""The ring: key/value chunks travel rank to rank by point-to-point exchanges.

Forward: at step s rank r attends its queries to the chunk of rank (r - s) mod P while the
chunk travels on to r + 1; partial results merge through their LSE. Backward: the chunks
travel the same way, each with its dK/dV accumulator, which arrives home after P steps.
Memory per rank is O(S / P): two chunk buffers and the accumulators, never the whole K/V.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .kernels import ChunkKernel
from .merge import LSE_DTYPE, merge_, out_accumulator_dtype
from .schedule import PairPlan, Tile, ring_owner
from .stats import record_send, record_step

Plans = Sequence[PairPlan]  # indexed by the K/V owner rank


class RingComm:
    """Sends to rank + 1 and receives from rank - 1 of ``group`` (None: a world of one)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank = 0 if group is None else group.rank()
        self.world_size = 1 if group is None else group.size()
        if group is not None:
            self._next = dist.get_global_rank(group, (self.rank + 1) % self.world_size)
            self._prev = dist.get_global_rank(group, (self.rank - 1) % self.world_size)

    def start(self, send: Tensor, recv: Tensor) -> list:
        """Begin sending ``send`` to the next rank and receiving into ``recv`` from the previous."""
        ops = [dist.P2POp(dist.isend, send, self._next, self.group),
               dist.P2POp(dist.irecv, recv, self._prev, self.group)]
        record_send(send.numel() * send.element_size())
        return dist.batch_isend_irecv(ops)

    def swap(self, send: Tensor, recv: Tensor) -> None:
        """Blocking ``start``: ``recv`` holds the previous rank's ``send`` on return."""
        for work in self.start(send, recv):
            work.wait()


def unit_last_stride(t: Tensor) -> Tensor:
    """``t`` itself when its last dim is dense, else a contiguous copy: kernels read rows of D
    contiguous elements (other dims may be strided, e.g. [B, S, H, D] transposed to [B, H, S, D])."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def _ring_steps(kv: Tensor, plans: Plans, comm: RingComm) -> Iterator[tuple[tuple[Tile, ...], Tensor]]:
    """Yield (tiles, visiting chunk) per ring step; the next chunk is already on its way meanwhile.

    ``kv`` [2, B, Hkv, L, D] is this rank's K and V; the chunk at step s is rank (r - s)'s.
    """
    recv = torch.empty_like(kv) if comm.world_size > 1 else None
    for step in range(comm.world_size):
        works = comm.start(kv, recv) if step < comm.world_size - 1 else []
        tiles = plans[ring_owner(comm.rank, step, comm.world_size)].tiles
        record_step(len(tiles))
        yield tiles, kv
        if works:
            _wait(works)
            kv, recv = recv, kv


def _local_kv(k: Tensor, v: Tensor, key_padding: Tensor | None) -> Tensor:
    """[2, B, Hkv, L, D]: this rank's K and V, zero at padding keys.

    Every tile masks padding keys, but a masked entry does not stop a NaN or Inf: the additive
    mask gives NaN + (-inf) = NaN in the scores, and 0 * NaN = NaN in P @ V. Zeroed before the
    exchange, padding keys hold finite values on every rank, whatever the caller's K and V hold.
    """
    kv = torch.stack((k, v))
    if key_padding is not None:
        kv = kv.masked_fill(key_padding.view(1, key_padding.shape[0], 1, -1, 1), 0)
    return kv


def ring_forward(q: Tensor, k: Tensor, v: Tensor, plans: Plans, comm: RingComm,
                 kernel: ChunkKernel, scale: float,
                 key_padding: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact attention of local ``q`` [B, Hq, L, D] against every rank's ``k``/``v`` [B, Hkv, L, D].

    Args:
        key_padding: this rank's padding keys [B, L] (bool, see ``local_key_padding``); their K
            and V never reach any output, whatever values (NaN, Inf) they hold.

    Returns:
        out [B, Hq, L, D] in q's dtype (contiguous) and lse [B, Hq, L] in float64 (``LSE_DTYPE``).
    """
    q = unit_last_stride(q)
    out = q.new_zeros(q.shape, dtype=out_accumulator_dtype(q.dtype))
    lse = q.new_full(q.shape[:-1], float("-inf"), dtype=LSE_DTYPE)
    for tiles, kv in _ring_steps(_local_kv(k, v, key_padding), plans, comm):
        for tile in tiles:
            rows, cols = tile.q_rows, tile.kv_rows
            tile_out, tile_lse = kernel.forward(q[:, :, rows], kv[0, :, :, cols], kv[1, :, :, cols], tile, scale)
            merge_(out[:, :, rows], lse[:, :, rows], tile_out, tile_lse)
    return out.to(q.dtype), lse


def ring_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  plans: Plans, comm: RingComm, kernel: ChunkKernel, scale: float,
                  key_padding: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``ring_forward`` from its saved merged ``out`` and ``lse``: no recompute.

    Args:
        key_padding: as for ``ring_forward``; dk and dv are exactly zero at padding keys.

    Returns:
        dq [B, Hq, L, D], dk and dv [B, Hkv, L, D], in the inputs' dtypes.
    """
    grad_out, q, out = (unit_last_stride(t) for t in (grad_out, q, out))
    acc = out_accumulator_dtype(q.dtype)
    # A row with no key anywhere has lse = -inf; +inf makes every probability exp(s - lse) zero.
    # The kernel recomputes probabilities in its own LSE dtype (the forward's: float32 for
    # float32 and bfloat16), as one device's backward does.
    lse = lse.masked_fill(lse == float("-inf"), float("inf")).to(acc)
    dq = q.new_zeros(q.shape, dtype=acc)
    dkv = q.new_zeros((2, *k.shape), dtype=acc)
    dkv_recv = torch.empty_like(dkv) if comm.world_size > 1 else None
    for tiles, kv in _ring_steps(_local_kv(k, v, key_padding), plans, comm):
        for tile in tiles:
            rows, cols = tile.q_rows, tile.kv_rows
            tile_dq, tile_dk, tile_dv = kernel.backward(
                grad_out[:, :, rows], q[:, :, rows], kv[0, :, :, cols], kv[1, :, :, cols],
                out[:, :, rows], lse[:, :, rows], tile, scale)
            dq[:, :, rows] += tile_dq
            dkv[0, :, :, cols] += tile_dk
            dkv[1, :, :, cols] += tile_dv
        if dkv_recv is not None:
            # This chunk's gradient moves on with the chunk; after P moves it is home.
            comm.swap(dkv, dkv_recv)
            dkv, dkv_recv = dkv_recv, dkv
    if key_padding is not None:
        # Already zero unless a query is non-finite (0 * Inf); padding keys take no gradient at all.
        dkv = dkv.masked_fill(key_padding.view(1, key_padding.shape[0], 1, -1, 1), 0)
    # dk and dv are views of one buffer: copy them apart, an op's outputs must not alias.
    return dq.to(q.dtype), dkv[0].to(k.dtype, copy=True), dkv[1].to(v.dtype, copy=True)
