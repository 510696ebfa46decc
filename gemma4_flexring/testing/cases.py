"""The scenario catalog: every mask and every placement of documents, image blocks and padding that
the tests and the tools (selfcheck, bench, graph) run, each defined once.

- Masks by name (``SPECS``); ``with_window`` gives one at another window. FlexMasks by name
  (``FLEX_MASKS``): the presets and a few masks users write (shared-prefix continuations, block
  diffusion; a per-head mask, which the ring refuses).
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

from .. import FlexMask, Layout, MaskSpec, SequenceInfo, presets
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
    def mask(self) -> MaskSpec | FlexMask:
        """``SPECS[spec]``, or the FlexMask ``FLEX_MASKS[spec]`` builds for the case's shape."""
        return SPECS[self.spec] if self.spec in SPECS else FLEX_MASKS[self.spec](self.batch, self.seq_len)

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
    segments per rank); "balanced_stack" is the balanced layout weighing ``STACK_MIX``, "balanced"
    weighs a FlexMask case's own mask."""
    mask = case.mask
    masks = STACK_MIX if kind == "balanced_stack" else [(mask, 1)] if isinstance(mask, FlexMask) else None
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


# ------------------------------------------------------------------------------ FlexMasks


def shared_prefix(prefix: torch.Tensor, branch_ids: torch.Tensor):
    """Shared-prefix continuations (a user's FlexMask factory): the first ``prefix`` ([] int)
    positions are a prompt; each continuation (``branch_ids`` [B, S], one id per branch) sees the
    prompt and itself, causally."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < prefix) | (branch_ids[b, q_idx] == branch_ids[b, kv_idx]))

    return mask_mod


def block_diffusion(block: torch.Tensor, half: torch.Tensor):
    """Block diffusion (BD3-LM, a user's FlexMask factory): positions below ``half`` are the noised
    copy x_t, the rest the clean x_0, both in blocks of ``block`` ([] int). Noised tokens see their
    own noised block both ways and the clean tokens of earlier blocks; clean tokens see the clean
    tokens of their block and earlier ones."""

    def mask_mod(b, h, q_idx, kv_idx):
        q_clean, kv_clean = q_idx >= half, kv_idx >= half
        q_block = torch.div(torch.where(q_clean, q_idx - half, q_idx), block, rounding_mode="floor")
        kv_block = torch.div(torch.where(kv_clean, kv_idx - half, kv_idx), block, rounding_mode="floor")
        own = (q_block == kv_block) & (q_clean == kv_clean)
        earlier_clean = (kv_block < q_block) & kv_clean
        return own | earlier_clean | ((kv_block == q_block) & q_clean & kv_clean)

    return mask_mod


def per_head(first_heads: torch.Tensor):
    """A per-head mask (refused by the ring): heads below ``first_heads`` causal, the others all."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (h >= first_heads)

    return mask_mod


def _flags(batch: int, seq_len: int, *positions: int) -> torch.Tensor:
    flags = torch.zeros(batch, seq_len, dtype=torch.bool)
    flags[:, list(positions)] = True
    flags[-1, seq_len // 3] = True  # rows differ
    return flags


def _packed(batch: int, seq_len: int) -> torch.Tensor:
    return make_info("documents", batch, seq_len).document_ids


# Each (batch, seq_len) -> FlexMask, with tensors placed relative to the length so that prefixes,
# chunks, global tokens and branches cross rank boundaries; rows differ where a tensor is per row.
FLEX_MASKS = {
    "flex_causal": lambda batch, s: FlexMask(presets.causal),
    "flex_sliding": lambda batch, s: FlexMask(presets.sliding_window, window=torch.tensor(6)),
    "flex_chunked": lambda batch, s: FlexMask(presets.chunked, chunk=torch.tensor(s // 5)),
    "flex_prefix_lm": lambda batch, s: FlexMask(presets.prefix_lm, prefix=torch.arange(batch) * (s // 4) + s // 3),
    "flex_global": lambda batch, s: FlexMask(presets.global_tokens, is_global=_flags(batch, s, 1, s // 2 + 1, s - 3)),
    "flex_global_window": lambda batch, s: FlexMask(presets.global_tokens, is_global=_flags(batch, s, 0, s // 2),
                                                    window=torch.tensor(5)),
    "flex_dilated": lambda batch, s: FlexMask(presets.dilated_sliding_window, window=torch.tensor(9),
                                              dilation=torch.tensor(3)),
    "flex_prefix_lm_documents": lambda batch, s: FlexMask(presets.prefix_lm, prefix=torch.tensor(4),
                                                          document_ids=_packed(batch, s)),
    "flex_chunked_documents": lambda batch, s: FlexMask(presets.chunked, chunk=torch.tensor(7),
                                                        document_ids=_packed(batch, s)),
    "flex_shared_prefix": lambda batch, s: FlexMask(shared_prefix, prefix=torch.tensor(s // 3),
                                                    branch_ids=torch.arange(s).expand(batch, s) * 4 // s),
    "flex_block_diffusion": lambda batch, s: FlexMask(block_diffusion, block=torch.tensor(5),
                                                      half=torch.tensor(s // 2)),
}

# FlexMasks over long sequences with small blocks, as ``EXCHANGE_CASES``: most of a chunk is
# needed by no other rank, and what is sent must be what the mask needs.
FLEX_EXCHANGE_CASES = [
    Case("flex_sliding", "none", seq_len=192, block_size=8),
    Case("flex_chunked", "padding", seq_len=192, block_size=8),
    Case("flex_global_window", "none", seq_len=192, block_size=8),
    Case("flex_prefix_lm_documents", "none", seq_len=192, block_size=8),
    Case("flex_dilated", "documents", seq_len=192, block_size=8),
]
