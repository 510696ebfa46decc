"""The scenario catalog: every mask and every placement of documents, image blocks and padding that
the tests and the tools (selfcheck, bench, graph) run, each defined once.

- Masks by name (``SPECS``); ``with_window`` gives one at another window.
- Metadata by kind (``INFOS``, ``make_info``), placed relative to the sequence length so that
  documents, image blocks and padding cross rank boundaries.
- Ring cases (``Case``, ``make_tensors``, ``make_layout``): a mask, a metadata kind, shapes, dtype.
- Named views of the same scenarios: ``FEATURES`` (selfcheck, one per mask feature), bench figures
  (``FIGURES``, ``figure_masks``, ``figure_info``: a sequence of hundreds of thousands of tokens
  packed as a training batch is), training batches for the compile tests (``training_info``), a
  long packed row for the planning benchmark (``long_row_info``) and the numerics tests' error
  cases (``ErrorCase``).

Shape legend: B batch rows, S whole sequence, Hq query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .. import Layout, MaskSpec, SequenceInfo
from ..layout import LayerMix

# ------------------------------------------------------------------------------ masks

SPECS = {
    "causal": MaskSpec(causal=True),
    "sliding": MaskSpec(causal=True, sliding_window=7),
    "sliding_wide": MaskSpec(causal=True, sliding_window=40),
    "sliding_vision": MaskSpec(causal=True, sliding_window=7, block_bidirectional=True),
    "causal_vision": MaskSpec(causal=True, block_bidirectional=True),
    "bidirectional": MaskSpec(causal=False),
    "bidirectional_window": MaskSpec(causal=False, sliding_window=5),
}


def with_window(spec: MaskSpec, window: int) -> MaskSpec:
    """``spec`` with its sliding window set to ``window`` (a spec without a window is returned as is:
    the tools scale the catalog's windows, made for its 48-token cases, to their lengths)."""
    return spec if spec.sliding_window is None else replace(spec, sliding_window=window)


# ------------------------------------------------------------------------------ metadata

INFOS = ("none", "documents", "padding", "vision", "packed_padded", "all")


def make_info(kind: str, batch: int, seq_len: int) -> SequenceInfo | None:
    """Metadata of kind ``kind`` (``INFOS``), [B, S] each, whose blocks and documents cross rank
    boundaries; image 0 is longer than a window of 7, rows differ, and the last row ends in a whole
    padded document (its queries see no key)."""
    if kind == "none":
        return None
    s = seq_len
    docs = torch.zeros(batch, s, dtype=torch.long)
    docs[:, s * 3 // 8:] = 1
    docs[:, s * 7 // 8:] = 2
    docs[-1, : s // 4] = 3  # rows differ
    blocks = torch.full((batch, s), -1, dtype=torch.long)
    blocks[:, s // 5: s * 3 // 5] = 0
    blocks[:, s * 3 // 4: s * 3 // 4 + 4] = 1
    padding = torch.zeros(batch, s, dtype=torch.bool)
    padding[-1, s * 7 // 8:] = True  # a whole padded document: its queries see no key
    padding[0, :2] = True
    use = {"documents": (docs, None, None), "padding": (None, None, padding), "vision": (None, blocks, None),
           "packed_padded": (docs, None, padding), "all": (docs, blocks, padding)}[kind]
    return SequenceInfo(*use)


# ------------------------------------------------------------------------------ ring cases


@dataclass(frozen=True)
class Case:
    """One ring problem: mask ``SPECS[spec]``, metadata ``make_info(info, ...)``, shapes and sizes."""

    spec: str
    info: str
    dtype: torch.dtype = torch.float64
    seq_len: int = 48
    batch: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    scale: float | None = None
    seed: int = 0
    block_size: int | None = None
    piece_rows: int | None = None  # the exchange's piece size (None: the package's)
    strided: bool = False  # q, k, v with a non-unit stride in the head dim
    kernel: str | None = None  # the chunk kernel (None: by device)

    @property
    def mask(self) -> MaskSpec:
        return SPECS[self.spec]

    def metadata(self) -> SequenceInfo | None:
        return make_info(self.info, self.batch, self.seq_len)


def make_tensors(case: Case) -> tuple[torch.Tensor, ...]:
    """Whole-sequence q [B, Hq, S, D], k, v [B, Hkv, S, D] and an output gradient [B, Hq, S, D],
    drawn in float64 from the case's seed and rounded to its dtype."""
    g = torch.Generator().manual_seed(case.seed)
    b, s, d = case.batch, case.seq_len, case.head_dim
    q = torch.randn(b, case.q_heads, s, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, case.kv_heads, s, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, case.kv_heads, s, d, generator=g, dtype=torch.float64)
    grad = torch.randn(b, case.q_heads, s, d, generator=g, dtype=torch.float64)
    return tuple(t.to(case.dtype) for t in (q, k, v, grad))


def layout_of(kind: str, world_size: int, info: SequenceInfo | None, batch: int, seq_len: int,
              masks: LayerMix | None = None) -> Layout:
    """``kind`` over ``world_size`` ranks; "balanced" is computed from the metadata ``info``
    (None: a [batch, seq_len] batch without metadata), weighing the layer mix ``masks`` (None: one
    causal layer)."""
    if kind != "balanced":
        return Layout(kind, world_size)
    return Layout.balanced(info or SequenceInfo(shape=(batch, seq_len)), world_size, masks=masks)


# A Gemma-4-like stack's layer mix at the catalog's scale (five sliding layers of window 7 to one
# global): the "balanced_stack" layout of the ring cases.
STACK_MIX = ((SPECS["sliding"], 5), (SPECS["causal"], 1))


def make_layout(kind: str, world_size: int, case: Case) -> Layout:
    """``layout_of`` the case's metadata (whose short sequences give small grains, hence many
    segments per rank); "balanced_stack" is the balanced layout weighing ``STACK_MIX``."""
    masks = STACK_MIX if kind == "balanced_stack" else None
    return layout_of(kind.removesuffix("_stack"), world_size, case.metadata(), case.batch, case.seq_len, masks)


# Long sequences with a small window and small blocks: most owners hold nothing a rank needs (its
# exchange is skipped), the rest send a halo of about W rows; documents and padding cut more.
EXCHANGE_CASES = [
    Case("sliding", "none", seq_len=192, block_size=8),
    Case("sliding_vision", "all", seq_len=192, block_size=8),
    Case("bidirectional_window", "packed_padded", seq_len=192, block_size=8),
    Case("causal", "documents", seq_len=192, block_size=8),
]

# ------------------------------------------------------------------------------ selfcheck's view

# One scenario per mask feature: (mask, metadata kind).
FEATURES = {
    "causal": ("causal", "none"),
    "sliding": ("sliding", "none"),
    "bidirectional": ("bidirectional", "none"),
    "bidirectional_window": ("bidirectional_window", "none"),
    "vision": ("sliding_vision", "vision"),
    "documents": ("causal", "documents"),
    "padding": ("causal", "packed_padded"),
    "all": ("sliding_vision", "all"),
}


def feature(name: str, batch: int, seq_len: int) -> tuple[MaskSpec, SequenceInfo | None]:
    """The mask and metadata of feature ``name`` at any length: windows are S/8 (at least 2)."""
    spec, info = FEATURES[name]
    return with_window(SPECS[spec], max(2, seq_len // 8)), make_info(info, batch, seq_len)


# ------------------------------------------------------------------------------ bench's view

FIGURES = ("causal", "sliding", "packed", "vision")
# Packed rows with uneven documents: document lengths per row at PACKING_BASE tokens, scaled to the
# sequence length (the last document takes what is left). "equal" is ``documents`` equal documents.
PACKING_BASE = 16384
PACKINGS = {
    "long_tail": [[14000]],                                   # one long document and a short tail
    "long_four": [[12000, 1100, 1500, 900]],                  # a long document and four short ones
    "six_uneven": [[5000, 3000, 2500, 1884, 2500]],           # six uneven documents
    "four_equal": [[4096, 4096, 4096]],                       # four equal documents
    "two_rows": [[14000], [5000, 3000, 2500, 1884, 2500]],    # B=2, rows packed differently
}


def figure_masks(name: str, window: int, stack: int) -> list[tuple[str, MaskSpec]]:
    """(kind, mask) of each layer of bench figure ``name``: one layer, or a Gemma-4-like stack of
    ``stack`` layers (five sliding layers of ``window`` to one global one)."""
    causal = SPECS["causal"]
    sliding = with_window(SPECS["sliding_vision" if name == "vision" else "sliding"], window)
    one = causal if name in ("causal", "packed") else sliding
    if not stack:
        return [(name, one)]
    return [("global", causal) if i % 6 == 5 else ("sliding", sliding) for i in range(stack)]


def packed_documents(packing: str, batch: int, seq_len: int, documents: int) -> torch.Tensor:
    """[B, S] document ids of the named packing (its own row count for the uneven ones)."""
    if packing == "equal":
        return (torch.arange(seq_len) * documents // seq_len).expand(batch, -1).contiguous()
    rows = []
    for lengths in PACKINGS[packing]:
        cuts = [n * seq_len // PACKING_BASE for n in lengths]
        cuts.append(seq_len - sum(cuts))
        rows.append(torch.cat([torch.full((n,), i) for i, n in enumerate(cuts) if n > 0]))
    return torch.stack(rows)


def figure_info(name: str, batch: int, seq_len: int, documents: int, packing: str = "equal") -> SequenceInfo:
    """The metadata of bench figure ``name``: packed documents for "packed", image blocks for
    "vision" (an image of S/16 every quarter), none otherwise."""
    if name == "packed":
        return SequenceInfo(document_ids=packed_documents(packing, batch, seq_len, documents))
    if name == "vision":
        blocks = torch.full((batch, seq_len), -1, dtype=torch.long)
        for n in range(4):
            start = n * seq_len // 4 + seq_len // 8
            blocks[:, start:start + seq_len // 16] = n
        return SequenceInfo(block_ids=blocks)
    return SequenceInfo(shape=(batch, seq_len))


# ------------------------------------------------------------------------------ training batches


def long_row_info(seq_len: int) -> SequenceInfo:
    """One long packed row [1, S], for the planning benchmark: documents of 3000 tokens, a
    256-token image every 2048 tokens, the last 100 tokens padding."""
    pos = torch.arange(seq_len).view(1, -1)
    return SequenceInfo(pos // 3000, torch.where(pos % 2048 < 256, pos // 2048, -1), pos >= seq_len - 100)


def training_info(seq_len: int, batch: int = 2, seed: int = 0) -> SequenceInfo:
    """A training batch's metadata, for the compile tests: documents, an image block longer than a
    window of 8 and a padded tail, all length-dependent; ``seed`` moves the image's start and the
    first document boundary (same length, another packing)."""
    g = torch.Generator().manual_seed(seed + seq_len)
    s = seq_len
    documents = torch.zeros(batch, s, dtype=torch.long)
    documents[:, s // 3 + seed % 5:] = 1
    documents[:, s * 3 // 4:] = 2
    documents[-1, : s // 4] = 3
    blocks = torch.full((batch, s), -1, dtype=torch.long)
    start = int(torch.randint(0, s // 4, (), generator=g))
    blocks[:, start: start + s // 3] = 0
    padding = torch.zeros(batch, s, dtype=torch.bool)
    padding[-1, s - 3:] = True
    return SequenceInfo(documents, blocks, padding)


# ------------------------------------------------------------------------------ numerics' view

ERROR_SPECS = {"causal": SPECS["causal"], "window_documents": with_window(SPECS["sliding"], 100)}


@dataclass(frozen=True)
class ErrorCase:
    """One comparison of the ring's error with one device's. ``draw``: "rand" (PyTorch's CP test
    draws torch.rand: all-positive scores and a large LSE, where a float32 merge hurt most) or
    "randn"."""

    spec: str
    dtype: torch.dtype
    draw: str = "rand"
    batch: int = 1
    q_heads: int = 4
    kv_heads: int = 2
    seq_len: int = 288  # splits into 2, 3 and 4 ranks' zigzag pieces
    head_dim: int = 32
    seed: int = 0

    @property
    def mask(self) -> MaskSpec:
        return ERROR_SPECS[self.spec]

    def info(self) -> SequenceInfo | None:
        """Three documents (boundaries at S/3 and 3S/4) under the windowed mask, none otherwise."""
        if self.spec != "window_documents":
            return None
        docs = torch.zeros(self.batch, self.seq_len, dtype=torch.long)
        docs[:, self.seq_len // 3:] = 1
        docs[:, self.seq_len * 3 // 4:] = 2
        return SequenceInfo(document_ids=docs)
