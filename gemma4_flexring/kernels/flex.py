"""Flex chunk kernel: FlexAttention fed each segment pair's ``BlockMask``.

Forward: the ``flex_attention`` HOP with the LSE (``return_aux=AuxRequest(lse=True)``'s options), GQA native.
Backward: ``torch.ops.higher_order.flex_attention_backward`` fed the ring's *merged* out and LSE,
so each pair's gradient share needs no forward recompute, as on the aten path.

How each torch version's HOPs are called (and the LSE's base-2 convention) lives in
``flex_hops``; eager and compiled runs share those functions.

On CUDA both functions are compiled once, at import (``torch.compile`` is lazy: nothing compiles
until the first call), ``fullgraph=True, dynamic=True``: lengths and the segments' offsets
(0-d tensors in the mask_mods) are symbolic, so neither recompiles per length. Their dynamo
settings apply inside ``_scope`` only. On torch 2.11 dynamo cannot trace the backward HOP, so
there the backward runs eagerly (flex's dense math path: exact, slower, memory per call
proportional to its rows times its keys) and says so in a RuntimeWarning. On CPU both run eagerly:
flex's unfused path, slow, meant for tests (compiled flex on CPU cannot return the LSE).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from functools import lru_cache

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, _apply_kernel_options

from ..planning import context
from ..planning.flex_calls import block_mask_from_flags
from ..planning.plan import CallPlan, PairPlan
from . import flex_hops

# One flex call at a time per process: the flex HOPs trace the mask with torch.fx, whose symbolic
# tracer keeps global state, so the threads of a simulated ring must not call them concurrently
# (measured: "CURRENT_PATCHER is None"). Uncontended with one rank per process.
_CALLS = threading.Lock()


def compiled(backend="inductor") -> tuple:
    """(forward, backward) compiled with ``backend``, fullgraph and dynamic in length; the
    backward stays eager where dynamo cannot trace it (torch 2.11: ``flex_hops``)."""
    forward = torch.compile(flex_hops.forward, backend=backend, fullgraph=True, dynamic=True)
    if not flex_hops.BACKWARD_COMPILES:
        return forward, flex_hops.backward
    return forward, torch.compile(flex_hops.backward, backend=backend, fullgraph=True, dynamic=True)


_CUDA_FORWARD, _CUDA_BACKWARD = compiled()

# Graphs differ by mask structure, dtype, head dim and GQA ratio: a Gemma 4 model needs a few
# per kernel, more than dynamo's default limit of 8.
RECOMPILE_LIMIT = 64


@contextlib.contextmanager
def _scope():
    """Dynamo settings for our compiled calls only: the user's stance ("fail_on_recompile",
    "force_eager") and ``error_on_recompile`` govern their code, not ours, and ours do not leak."""
    with torch.compiler.set_stance("default"), torch._dynamo.config.patch(
            recompile_limit=RECOMPILE_LIMIT, error_on_recompile=False):
        yield


def cuda_options(head_dim: int, dtype: torch.dtype) -> dict:
    """Triton tile sizes that fit one SM's shared memory (H100/H200: 227 KB per block).

    Estimates, bf16/fp16 (fp32 doubles the bytes): forward keeps a BLOCK_M x D query tile and
    ``num_stages`` BLOCK_N x D key and value tiles; the backward keeps both sides' tiles of two
    operands each. Flex's defaults for D > 256 (64 x 32, 3 stages: ~256 KB forward) and its sm90
    backward default for D > 128 (64 x 64, 2 stages) do not fit at D = 512. Not run on a GPU here.
    """
    options: dict = {"BACKEND": "TRITON"}
    wide = dtype == torch.float32
    if head_dim <= 128:
        return options
    if head_dim <= 256:
        # forward 32 KB + 2 x 32 KB (bf16); backward ~96 KB.
        tiles = dict(fwd_BLOCK_M=64, fwd_BLOCK_N=32, fwd_num_stages=2, fwd_num_warps=4,
                     bwd_BLOCK_M1=32, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=32,
                     bwd_num_stages=1, bwd_num_warps=4)
        if wide:
            tiles.update(fwd_BLOCK_M=32, bwd_BLOCK_M1=16, bwd_BLOCK_N1=32, bwd_BLOCK_M2=32, bwd_BLOCK_N2=16)
    else:
        # D = 512: forward 32 KB + 2 x 64 KB = 160 KB (bf16); backward ~96 KB, 8 warps so the
        # BLOCK_N1 x D fp32 dK/dV accumulators fit in registers.
        tiles = dict(fwd_BLOCK_M=32, fwd_BLOCK_N=32, fwd_num_stages=2, fwd_num_warps=4,
                     bwd_BLOCK_M1=16, bwd_BLOCK_N1=32, bwd_BLOCK_M2=32, bwd_BLOCK_N2=16,
                     bwd_num_stages=1, bwd_num_warps=8)
        if wide:
            tiles.update(fwd_BLOCK_M=16, fwd_BLOCK_N=16, fwd_num_stages=1, bwd_BLOCK_N1=16, bwd_BLOCK_M2=16)
    options.update(tiles)
    return options


@lru_cache(maxsize=256)
def _full_block_mask(q_len: int, kv_len: int, device: torch.device, block_size: int) -> BlockMask:
    """A BlockMask allowing every entry (for segment pairs no mask applies to)."""
    q_blocks, kv_blocks = -(-q_len // block_size), -(-kv_len // block_size)
    complete = ((torch.arange(q_blocks, device=device) < q_len // block_size)[:, None]
                & (torch.arange(kv_blocks, device=device) < kv_len // block_size)[None, :])
    return block_mask_from_flags(torch.ones_like(complete)[None, None], complete[None, None], block_size,
                                 _allow_all, (q_len, kv_len))


def _allow_all(b, h, q_idx, kv_idx):
    return q_idx >= 0


def _operands(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Detached, contiguous copies where needed: the ring passes views (rows of q, of a chunk), and
    a compiled call guards on its inputs' strides against their sizes, so views cut differently
    compiled graphs of their own (measured on the CPU with dynamo's compile counter)."""
    return tuple(t.detach().contiguous() for t in tensors)


def _warn_eager_backward() -> None:
    """Said once per process by warnings' default filter (same message, same place)."""
    warnings.warn(
        f"torch {torch.__version__}: dynamo cannot compile FlexAttention's backward as the flex "
        "kernel calls it, so it runs eagerly (exact, slower, dense memory per call); torch >= 2.12 "
        "compiles it", RuntimeWarning, stacklevel=3)


class FlexKernel:
    """``ChunkKernel`` over FlexAttention: one call per segment pair, with its BlockMask.

    Args:
        compile_backend: None compiles with inductor on CUDA and runs eagerly elsewhere; a
            backend (e.g. "eager" or a ``CompileCounter``) compiles with it on any device, which
            lets CPU tests check the compiled path's guards and scope.
    """

    name = "flex"
    devices = ("cpu", "cuda")
    reads_whole_blocks = True

    def __init__(self, compile_backend=None) -> None:
        self._compiled = None if compile_backend is None else compiled(compile_backend)

    def view(self, plan: PairPlan) -> CallPlan:
        """The segment pairs with their BlockMasks, and the whole key blocks they read."""
        return CallPlan(plan.pairs, plan.pair_rows)

    def _functions(self, device: torch.device):
        if self._compiled is not None:
            return (*self._compiled, _scope)
        if device.type == "cuda":
            return _CUDA_FORWARD, _CUDA_BACKWARD, _scope
        return flex_hops.forward, flex_hops.backward, contextlib.nullcontext

    @staticmethod
    def _mask_and_options(q: Tensor, k: Tensor, v: Tensor, pair) -> tuple[BlockMask, dict]:
        block_mask = pair.block_mask
        if block_mask is None:
            block_mask = _full_block_mask(q.shape[2], k.shape[2], q.device, context.BLOCK_SIZE)
        options = cuda_options(q.shape[-1], q.dtype) if q.device.type == "cuda" else {}
        # The full option set the HOPs read (what flex_attention derives from user options).
        return block_mask, _apply_kernel_options(q, k, v, True, options, AuxRequest(lse=True))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pair, scale: float) -> tuple[Tensor, Tensor]:
        forward, _, scope = self._functions(q.device)
        block_mask, options = self._mask_and_options(q, k, v, pair)
        # An op's body sees its inputs' requires_grad without recording; flex refuses such inputs on CPU.
        q, k, v = _operands(q, k, v)
        with _CALLS, scope():
            # Rows with no allowed key come back as out = 0, lse = -inf: the merge gives them no weight.
            return forward(q, k, v, block_mask, scale, options)

    def backward_operands(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tensors

    def backward(self, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 pair, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        _, backward, scope = self._functions(q.device)
        if scope is _scope and not flex_hops.BACKWARD_COMPILES:  # a compiled path, minus its backward
            _warn_eager_backward()
        block_mask, options = self._mask_and_options(q, k, v, pair)
        operands = _operands(grad_out, q, k, v, out, lse)
        with _CALLS, scope():
            return backward(*operands, block_mask, scale, options)
