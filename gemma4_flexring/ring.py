"""The ring: each rank attends its queries to every owner's K/V rows, received directly.

Forward: at step s rank r attends to the rows of owner (r - s) mod P that its tiles read,
sent straight from the owner (``exchange.py``), and partial results merge through their LSE in
place. Step s + 1's exchange is posted before step s computes. Backward: the same rows travel
again, one step ahead; each step is computed piece by piece (``exchange.Piece``), and the dK/dV
of a received piece go back to their owner, who adds them up, as soon as the piece is computed,
while the next piece computes. Each step's K/V (sends and receives) go out in one
``batch_isend_irecv``; a step with nothing to send or receive posts nothing.

Calls run in row groups (``row_groups``): consecutive calls on the same few query rows, whose
forward results merge at once and whose query rows the backward prepares once; the backward
prepares a piece's K/V rows once for all its calls.

Alone calls (``exchange.split_alone``: the only contributor to their query rows and key rows)
are computed on the inputs as they are, in their dtype, and their results written; when every
call is alone (``Exchange.lone``) the outputs are put together in the inputs' dtype, with no
float32 accumulator, and when one call is all the work (``Exchange.whole_call``: P=1 causal or
unmasked) its results are the outputs: one device's computation, bit for bit.

Memory per rank: two preallocated K/V receive buffers as large as the most rows received in one
step; in the backward also two buffers of a piece of dK/dV being sent away, two of a piece coming
home, the piece being computed's K/V rows in the kernel's backward dtype, and one row group's
outputs (one call's, at most a piece of queries and keys, or up to ``GROUP_CALLS`` of at most
``GROUP_ROWS`` query rows; an alone call's, uncut, at most a chunk in the inputs' dtype), never
the whole K/V. Rows sent go as views of the chunk when they are one run (``by_head``), packed
into a copy otherwise.
"""

from __future__ import annotations

import time
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import Tensor

from .comm import Communicator
from .exchange import Exchange, Piece, Step, row_count
from .kernels import ChunkKernel
from .merge import LSE_DTYPE, merge_, out_accumulator_dtype
from .planning.rows import Rows
from .stats import record_step, record_wait

# A row group (``row_groups``): at most this many calls, each on at most this many query rows.
GROUP_CALLS, GROUP_ROWS = 4, 512
# A step's K (and V) rows travel as one message per (batch row, head) when they are one run of rows
# and there are at most this many such pairs (``by_head``): no packed copy (at P=8, S=32768,
# H=8/2, D=64, causal zigzag, packing half a chunk every step was 0.06x the whole K+V per rank).
MAX_HEAD_MESSAGES = 16


def unit_last_stride(t: Tensor) -> Tensor:
    """``t`` itself when its last dim is dense, else a contiguous copy: kernels read rows of D
    contiguous elements (other dims may be strided, e.g. [B, S, H, D] transposed to [B, H, S, D])."""
    return t if t.stride(-1) == 1 else t.contiguous()


def pack_rows(t: Tensor, rows: Rows) -> Tensor:
    """Rows ``rows`` of ``t`` [B, H, L, D] as one contiguous [B, H, n, D] tensor (``t`` itself
    when that is all of a contiguous ``t``)."""
    if rows == ((0, t.shape[2]),) and t.is_contiguous():
        return t
    parts = [t[:, :, a:b] for a, b in rows]
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, 2)


def by_head(rows: Rows, chunk_len: int, batch: int, heads: int) -> bool:
    """Whether K or V rows ``rows`` of a chunk of ``chunk_len`` rows, [batch, heads, ., D], travel
    as one message per (batch row, head): one run that is not the whole chunk (a slice the sender
    would otherwise pack into a copy), over 2 to ``MAX_HEAD_MESSAGES`` pairs. Sender and receiver
    decide alike: they hold the same rows (``Step.send_rows`` / ``Step.recv_rows``) and shapes."""
    return len(rows) == 1 and rows[0] != (0, chunk_len) and 1 < batch * heads <= MAX_HEAD_MESSAGES


def outgoing(t: Tensor, rows: Rows) -> list[Tensor]:
    """The messages carrying rows ``rows`` of ``t`` [B, H, L, D]: per (batch row, head) views of
    ``t`` when ``by_head`` (contiguous when each head's [L, D] is), else one packed tensor."""
    b, h, chunk_len, _ = t.shape
    if not by_head(rows, chunk_len, b, h):
        return [pack_rows(t, rows)]
    (start, stop), = rows
    return [t[i, j, start:stop].contiguous() for i in range(b) for j in range(h)]


def incoming(buffer: Tensor, rows: Rows, chunk_len: int) -> list[Tensor]:
    """The receive tensors of rows ``rows`` of an owner's chunk of ``chunk_len`` rows, packed in
    ``buffer`` [B, H, n, D] (contiguous), matching the owner's ``outgoing``."""
    b, h = buffer.shape[:2]
    return [buffer[i, j] for i in range(b) for j in range(h)] if by_head(rows, chunk_len, b, h) else [buffer]


def add_rows_(acc: Tensor, rows: Rows, packed: Tensor) -> None:
    """``acc[:, :, rows] += packed``, where ``packed`` [B, H, n, D] holds ``rows`` one after another."""
    at = 0
    for a, b in rows:
        acc[:, :, a:b].add_(packed[:, :, at:at + b - a])
        at += b - a


class _Buffers:
    """Preallocated flat storage, viewed as [B, H, n, D] tensors of any n up to its size."""

    def __init__(self, like: Tensor, rows: int, count: int, dtype: torch.dtype) -> None:
        b, h, _, d = like.shape
        self._shape = (b, h, d)
        self._flat = [like.new_empty(b * h * rows * d, dtype=dtype) for _ in range(count)] if rows else []

    def view(self, index: int, rows: int) -> Tensor:
        b, h, d = self._shape
        return self._flat[index][: b * h * rows * d].view(b, h, rows, d)


class _Posted(NamedTuple):
    works: list
    k: Tensor | None  # the K/V rows being received (None: none)
    v: Tensor | None
    keep: tuple  # tensors being sent: alive until the exchange completes


def _wait(works: list, backward: bool) -> None:
    """Wait for a posted exchange; a failure names the exchange and what usually causes it."""
    start = time.perf_counter()
    try:
        for work in works:
            work.wait()
    except RuntimeError as e:
        raise RuntimeError(
            f"gemma4_flexring: a ring exchange of the {'backward' if backward else 'forward'} pass failed: a peer "
            "stopped after the ranks agreed on the inputs (it raised, or its process died), or did not answer "
            f"within the process group's timeout. {type(e).__name__}: {e}") from e
    record_wait(time.perf_counter() - start, backward)


class _KVExchange:
    """The K/V traffic of one pass: two receive buffers, used alternately by steps."""

    def __init__(self, k: Tensor, v: Tensor, exchange: Exchange) -> None:
        self.k, self.v, self.exchange = k, v, exchange
        rows = exchange.max_recv_rows()
        self._kbuf, self._vbuf = (_Buffers(t, rows, 2, t.dtype) for t in (k, v))

    def visits(self, comm: Communicator, backward: bool):
        """Yield (index, step, k, v) for every step with the K/V it reads (step 0: the local
        chunk). The next step's K/V exchange is posted before a step is yielded, so it travels
        while the step computes, and waited for when the next step comes."""
        posted = None
        for index, step in enumerate(self.exchange.steps):
            k_step, v_step = self.k, self.v
            if posted is not None:
                _wait(posted.works, backward)
                k_step, v_step = posted.k, posted.v
            sends, recvs, k_in, v_in = self.ops(index + 1)
            posted = _Posted(comm.start(sends, recvs), k_in, v_in, tuple(t for _, t in sends))
            record_step(len(step.calls))
            yield index, step, k_step, v_step

    def ops(self, step: int):
        """(sends, receives, received k, received v) of ``step``'s K/V; nothing past the last step."""
        if step >= len(self.exchange.steps):
            return [], [], None, None
        s = self.exchange.steps[step]
        sends, recvs, k_in, v_in = [], [], None, None
        if s.send_rows:
            sends = [(s.send_to, m) for t in (self.k, self.v) for m in outgoing(t, s.send_rows)]
        if s.recv_rows:
            n = row_count(s.recv_rows)
            k_in, v_in = self._kbuf.view(step % 2, n), self._vbuf.view(step % 2, n)
            recvs = [(s.recv_from, m) for t in (k_in, v_in) for m in incoming(t, s.recv_rows, self.k.shape[2])]
        return sends, recvs, k_in, v_in


def without_padding(k: Tensor, v: Tensor, key_padding: Tensor | None) -> tuple[Tensor, Tensor]:
    """This rank's K and V [B, Hkv, L, D], zero at its padding keys ``key_padding`` [B, L].

    Every tile masks padding keys, but a masked entry does not stop a NaN or Inf: the additive
    mask gives NaN + (-inf) = NaN in the scores, and 0 * NaN = NaN in P @ V. Zeroed before the
    exchange, padding keys hold finite values on every rank, whatever the caller's K and V hold.
    """
    if key_padding is None:
        return k, v
    keys = key_padding.view(key_padding.shape[0], 1, -1, 1)
    return k.masked_fill(keys, 0), v.masked_fill(keys, 0)


def ring_forward(q: Tensor, k: Tensor, v: Tensor, comm: Communicator, kernel: ChunkKernel,
                 scale: float, exchange: Exchange, key_padding: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact attention of local ``q`` [B, Hq, L, D] against every rank's ``k``/``v`` [B, Hkv, L, D].

    Args:
        exchange: this rank's exchange schedule (``exchange.py``).
        key_padding: this rank's padding keys [B, L] (bool); their K and V never reach any
            output, whatever values (NaN, Inf) they hold.

    Returns:
        out [B, Hq, L, D] in q's dtype (contiguous) and lse [B, Hq, L] in float64 (``LSE_DTYPE``).
    """
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    k, v = without_padding(k, v, key_padding)
    whole = exchange.whole_call(q.shape[2])
    if whole is not None:  # all the work there is: its out and lse are the results
        out, lse = kernel.forward(q, k, v, whole, scale)
        _record_steps(exchange)
        # Contiguous, as the op's fake says (out follows q's strides, lse is [B, L, H] in memory).
        return out.to(q.dtype).contiguous(), lse.to(LSE_DTYPE).contiguous()
    out = q.new_zeros(q.shape, dtype=sum_dtype(q.dtype, exchange))
    lse = q.new_full(q.shape[:-1], float("-inf"), dtype=LSE_DTYPE)
    untouched = 0  # rows from here on hold no merged part yet (calls mostly come in row order)
    for _, step, k_step, v_step in _KVExchange(k, v, exchange).visits(comm, backward=False):
        for piece in step.pieces:
            for group in row_groups(piece.calls):
                rows = group[0].q_rows
                q_rows = q[:, :, rows]
                parts = [kernel.forward(q_rows, k_step[:, :, c.kv_rows], v_step[:, :, c.kv_rows], c, scale)
                         for c in group]
                # An alone call's rows take no other part: written, never merged (nor counted as touched).
                merge_(out[:, :, rows], lse[:, :, rows], parts, fresh=piece.alone or rows.start >= untouched)
                untouched = untouched if piece.alone else max(untouched, rows.stop)
                del parts  # freed before the next group's are made
    return out.to(q.dtype), lse


def _record_steps(exchange: Exchange) -> None:
    """Count the exchange's steps as ``_KVExchange.visits`` does, for a pass that needs no visits
    (``Exchange.whole_call``: its other steps, if any, move and compute nothing)."""
    for step in exchange.steps:
        record_step(len(step.calls))


def sum_dtype(dtype: torch.dtype, exchange: Exchange) -> torch.dtype:
    """The dtype in which ``out``, dq, dk and dv are put together from the calls' shares: the
    inputs' own when no row sums two shares (``Exchange.lone``: each row is written once, as
    one device writes it), else ``out_accumulator_dtype`` (float32, float64 for float64)."""
    return dtype if exchange.lone else out_accumulator_dtype(dtype)


def row_groups(calls: Sequence) -> Iterator[list]:
    """``calls`` in order, as groups of consecutive calls on the same query rows: at most
    ``GROUP_CALLS`` calls of at most ``GROUP_ROWS`` rows (a longer call is a group of its own). The
    forward merges a group's results at once, the backward prepares its query rows once: a
    sliding band's calls share both."""
    group: list = []
    for call in calls:
        if group and not (call.q_rows == group[0].q_rows and len(group) < GROUP_CALLS and _short(call)):
            yield group
            group = []
        group.append(call)
    if group:
        yield group


def _short(call) -> bool:
    return call.q_rows.stop - call.q_rows.start <= GROUP_ROWS


def scaled_half_shares(dtype: torch.dtype) -> bool:
    """Whether dK/dV shares of inputs of ``dtype`` travel as row-scaled float16 (``encode_rows``):
    for float16 and bfloat16 inputs; others travel in their accumulator dtype (float32, float64).

    Not in the inputs' own half precision: a share rounded to bfloat16 before it is added at home
    is one more rounding of bfloat16's size per step, measured to put dv at 2x one device's error
    (tests/test_numerics.py). Row-scaled float16 costs the same two bytes an element and rounds
    at 2^-11 of the row's largest element, 8x finer; only the sum at home is rounded to the inputs'
    dtype, as one device rounds once.
    """
    return dtype in (torch.float16, torch.bfloat16)


def encode_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """``t`` [B, H, n, D] (float32) as float16 values [B, H, n, D] and float32 scales [B, H, n, 1]:
    each row divided by its largest magnitude (rows of zeros by 1)."""
    scale = t.abs().amax(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (t / scale).to(torch.float16), scale


def decode_rows(values: Tensor, scale: Tensor) -> Tensor:
    """The float32 rows ``encode_rows`` encoded."""
    return values.to(torch.float32) * scale


def ring_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  comm: Communicator, kernel: ChunkKernel, scale: float,
                  exchange: Exchange, key_padding: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``ring_forward`` from its saved merged ``out`` and ``lse``: no recompute.

    Each step's K/V travel as in the forward, posted one step ahead. A step is computed piece by
    piece (``Step.pieces``). The dK/dV of the n-th received piece go to their owner as soon as it
    is computed, in one ``batch_isend_irecv`` with the receive of the n-th piece of dK/dV coming
    home for the rows this rank sent at that step, while the next piece computes.

    Every rank posts in the same order: step s + 1's K/V, then step s's pieces in order, then step
    s + 2's K/V. So the messages between two ranks are posted in the same order on both, and on
    NCCL, which runs a rank's exchanges one after another, every exchange's peers have posted
    everything before it: nothing waits in a cycle.

    Returns:
        dq [B, Hq, L, D], dk and dv [B, Hkv, L, D], in the inputs' dtypes.
    """
    grad_out, q, k, v, out = (unit_last_stride(t) for t in (grad_out, q, k, v, out))
    k, v = without_padding(k, v, key_padding)
    # A row with no key anywhere has lse = -inf; +inf makes every probability exp(s - lse) zero.
    # The kernel recomputes probabilities in its own LSE dtype (the forward's: float32 for
    # float32 and bfloat16), as one device's backward does.
    lse = lse.masked_fill(lse == float("-inf"), float("inf")).to(out_accumulator_dtype(q.dtype))
    whole = exchange.whole_call(q.shape[2])
    if whole is not None:
        # Its gradients are the results. Made contiguous once the kernel has returned: sums made
        # beforehand would take their memory beside the kernel's workspace (at P=1 causal, dK/dV
        # for every query head), 2.2x more than this.
        dq, dk, dv = (t.contiguous() for t in kernel.backward(grad_out, q, k, v, out, lse, whole, scale))
        _record_steps(exchange)
    else:
        dq, dk, dv = _summed_grads(grad_out, q, k, v, out, lse, comm, kernel, scale, exchange)
    if key_padding is not None:
        # Already zero unless a query is non-finite (0 * Inf); padding keys take no gradient at all.
        dk, dv = without_padding(dk, dv, key_padding)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _summed_grads(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  comm: Communicator, kernel: ChunkKernel, scale: float,
                  exchange: Exchange) -> tuple[Tensor, Tensor, Tensor]:
    """``ring_backward``'s dq [B, Hq, L, D], dk and dv [B, Hkv, L, D], summed from every call's
    shares and the dK/dV coming home, in ``sum_dtype``; lse [B, Hq, L] as the kernel takes it."""
    acc = sum_dtype(q.dtype, exchange)
    dq = q.new_zeros(q.shape, dtype=acc)
    dk, dv = k.new_zeros(k.shape, dtype=acc), v.new_zeros(v.shape, dtype=acc)  # two buffers: outputs must not alias
    grads = _TileGrads(grad_out, q, out, lse, dq, kernel, scale)
    pieces = _PieceGrads(comm, dk, dv, exchange, scaled_half_shares(k.dtype))
    for step, s, k_step, v_step in _KVExchange(k, v, exchange).visits(comm, backward=True):
        if step == 0:
            for piece in s.pieces:
                grads.add(piece, k_step, v_step, dk, dv, 0)
            continue
        for index in range(max(len(s.pieces), len(s.home))):
            away = None
            if index < len(s.pieces):
                piece = s.pieces[index]
                away = pieces.away(piece.stop - piece.start)
                grads.add(piece, k_step, v_step, *away, piece.start)
            pieces.post(s, index, away)
    pieces.finish()
    return dq, dk, dv


class _TileGrads:
    """The gradients of a piece's calls: their dQ added into ``dq``, their dK/dV into given buffers."""

    def __init__(self, grad_out, q, out, lse, dq, kernel: ChunkKernel, scale: float) -> None:
        self.grad_out, self.q, self.out, self.lse, self.dq = grad_out, q, out, lse, dq
        self.kernel, self.scale = kernel, scale

    def add(self, piece: Piece, k: Tensor, v: Tensor, dk: Tensor, dv: Tensor, first_row: int) -> None:
        """Add the dK/dV of ``piece``'s calls into ``dk``/``dv`` [B, Hkv, n, D], whose row 0 is key row
        ``first_row`` of ``k``/``v``. The piece's K/V rows are prepared for the kernel once (a key
        row is read by several calls: a sliding window's by about W / 256 bands), and each row
        group's (``row_groups``) query rows once for its calls. An alone piece's calls compute on
        the inputs as they are: their shares are the results, rounded once."""
        prepare = _as_they_are if piece.alone else self.kernel.backward_operands
        k, v = prepare(k[:, :, piece.start:piece.stop], v[:, :, piece.start:piece.stop])
        for group in row_groups(piece.calls):
            self._add_group(group, k, v, dk, dv, first_row, piece.start, prepare)

    def _add_group(self, group: list, k: Tensor, v: Tensor, dk: Tensor, dv: Tensor, first_row: int,
                   k_row: int, prepare) -> None:
        """``add`` for one row group, given its piece's prepared K/V rows (row 0 is key row ``k_row``)."""
        rows = group[0].q_rows
        grad_out, q, out = prepare(self.grad_out[:, :, rows], self.q[:, :, rows], self.out[:, :, rows])
        lse, dq = self.lse[:, :, rows], self.dq[:, :, rows]
        for call in group:
            cols = call.kv_rows
            call_k, call_v = k[:, :, cols.start - k_row:cols.stop - k_row], v[:, :, cols.start - k_row:cols.stop - k_row]
            call_dq, call_dk, call_dv = self.kernel.backward(grad_out, q, call_k, call_v, out, lse, call, self.scale)
            # add_ on the views: ``x[idx] += y`` would also copy the sum onto itself through __setitem__.
            dq.add_(call_dq)
            del call_dq
            at = slice(cols.start - first_row, cols.stop - first_row)
            dk[:, :, at].add_(call_dk)
            dv[:, :, at].add_(call_dv)


def _as_they_are(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tensors


class _PieceGrads:
    """The dK/dV pieces in flight, in two slots used in turn. A slot holds one piece's dK/dV
    going away to their owner and one coming home; reusing a slot waits for its last exchange
    and adds what came home into this rank's dK/dV. Shares are summed in ``dk``'s dtype and
    travel in it, or as row-scaled float16 (``scaled``: see ``scaled_half_shares``)."""

    def __init__(self, comm: Communicator, dk: Tensor, dv: Tensor, exchange: Exchange, scaled: bool) -> None:
        self.comm, self.dk, self.dv, self.scaled = comm, dk, dv, scaled
        away_rows, home_rows = exchange.max_piece_rows(home=False), exchange.max_piece_rows(home=True)
        self._away = _Buffers(dk, away_rows, 4, dk.dtype)  # slot n: views 2n, 2n + 1 (dK, dV)
        self._home = _Buffers(dk, home_rows, 4, torch.float16 if scaled else dk.dtype)
        self._home_scales = _Buffers(dk[..., :1], home_rows if scaled else 0, 4, torch.float32)
        self._busy: list = [None, None]  # per slot: (works, tensors sent, (rows, dK, dV) coming home or None)
        self._slot = 0

    def away(self, rows: int) -> tuple[Tensor, Tensor]:
        """Zeroed [B, Hkv, rows, D] dK and dV buffers of the next slot, for a received piece."""
        self._free(self._slot)
        return self._away.view(2 * self._slot, rows).zero_(), self._away.view(2 * self._slot + 1, rows).zero_()

    def post(self, step: Step, index: int, away: tuple[Tensor, Tensor] | None) -> None:
        """Post, in the next slot, piece ``index`` of ``step``: its dK/dV ``away`` (from ``away()``)
        to their owner and the receive of the piece coming home, whichever exist."""
        slot = self._slot
        self._free(slot)
        sent = () if away is None else tuple(x for t in away for x in (encode_rows(t) if self.scaled else (t,)))
        recvs, home = [], None
        if index < len(step.home):
            rows = step.home[index]
            home = (rows, *(self._home_parts(slot, part, row_count(rows)) for part in (0, 1)))
            recvs = [(step.send_to, t) for part in home[1:] for t in part]
        works = self.comm.start([(step.recv_from, t) for t in sent], recvs)
        self._busy[slot] = (works, sent, home)
        self._slot = 1 - slot

    def _home_parts(self, slot: int, part: int, n: int) -> tuple[Tensor, ...]:
        """The receive buffers of dK (``part`` 0) or dV (1) coming home: values, and scales if scaled."""
        values = self._home.view(2 * slot + part, n)
        return (values, self._home_scales.view(2 * slot + part, n)) if self.scaled else (values,)

    def _free(self, slot: int) -> None:
        if self._busy[slot] is None:
            return
        works, _, home = self._busy[slot]
        self._busy[slot] = None
        _wait(works, backward=True)
        if home is not None:
            rows, dk, dv = home
            add_rows_(self.dk, rows, decode_rows(*dk) if self.scaled else dk[0])
            add_rows_(self.dv, rows, decode_rows(*dv) if self.scaled else dv[0])

    def finish(self) -> None:
        for slot in (self._slot, 1 - self._slot):  # oldest first
            self._free(slot)
