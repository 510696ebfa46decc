"""How a sequence is split across context-parallel ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")


class Segment(NamedTuple):
    """A run of a rank's tokens that is contiguous in the global sequence."""

    local_start: int
    global_start: int
    length: int


@dataclass(frozen=True)
class Layout:
    """Sharding of a length-S sequence over ``world_size`` ranks.

    ``contiguous``: rank r holds the r-th of P equal pieces.
    ``zigzag``: rank r holds the r-th and the (2P-1-r)-th of 2P equal pieces, in that order,
    which balances causal work across ranks.

    Args:
        kind: "contiguous" or "zigzag".
        world_size: number of ranks P.
    """

    kind: str
    world_size: int

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ValueError(f"Layout kind must be one of {LAYOUTS}, got {self.kind!r}")
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"Layout world_size must be a positive int, got {self.world_size!r}")

    @property
    def pieces_per_rank(self) -> int:
        return 2 if self.kind == "zigzag" else 1

    def check_length(self, seq_len: int) -> None:
        """Raise ValueError unless ``seq_len`` splits into equal pieces."""
        pieces = self.world_size * self.pieces_per_rank
        if seq_len < pieces or seq_len % pieces:
            raise ValueError(
                f"{self.kind} layout over {self.world_size} ranks needs a sequence length that is a "
                f"positive multiple of {pieces}, got {seq_len}"
            )

    def segments(self, seq_len: int, rank: int) -> tuple[Segment, ...]:
        """The globally contiguous runs of ``rank``'s tokens, in local order."""
        self.check_length(seq_len)
        self._check_rank(rank)
        piece = seq_len // (self.world_size * self.pieces_per_rank)
        if self.kind == "contiguous":
            return (Segment(0, rank * piece, piece),)
        mirror = 2 * self.world_size - 1 - rank
        return (Segment(0, rank * piece, piece), Segment(piece, mirror * piece, piece))

    def positions(self, seq_len: int, rank: int) -> Tensor:
        """Global positions (int64 [S / P]) of ``rank``'s tokens, in local order."""
        return torch.cat([torch.arange(s.global_start, s.global_start + s.length)
                          for s in self.segments(seq_len, rank)])

    def shard(self, x: Tensor, dim: int, rank: int) -> Tensor:
        """``rank``'s part of the whole-sequence tensor ``x`` along ``dim``."""
        seq_len = x.shape[dim]
        parts = [x.narrow(dim, s.global_start, s.length) for s in self.segments(seq_len, rank)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def unshard(self, xs: Sequence[Tensor], dim: int) -> Tensor:
        """Reassemble the whole sequence from every rank's part (rank order)."""
        if len(xs) != self.world_size:
            raise ValueError(f"unshard needs {self.world_size} parts, got {len(xs)}")
        seq_len = sum(x.shape[dim] for x in xs)
        pieces: list[tuple[int, Tensor]] = []
        for rank, x in enumerate(xs):
            for s in self.segments(seq_len, rank):
                pieces.append((s.global_start, x.narrow(dim, s.local_start, s.length)))
        return torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], dim=dim)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
