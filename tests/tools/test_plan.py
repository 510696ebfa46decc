"""``python -m gemma4_flexring plan``: its block classes and rows sent against the dense float64
reference mask (sharded by the layout), and the command end to end (figures, PNG)."""

from __future__ import annotations

import pytest
import torch

from gemma4_flexring import Layout, MaskSpec, SequenceInfo
from gemma4_flexring.planning.blocks import EMPTY, FULL, PARTIAL
from gemma4_flexring.testing.cases import FLEX_MASKS
from gemma4_flexring.testing.reference import reference_mask
from gemma4_flexring.tools.plan import main, mask_picture

S, BLOCK = 256, 16


def packed_info() -> SequenceInfo:
    """Two rows: documents (cut at 90 and 170 / at 130), an image block across a rank boundary,
    padding at the end of the second row."""
    documents = torch.zeros(2, S, dtype=torch.long)
    documents[0, 90:] = 1
    documents[0, 170:] = 2
    documents[1, 130:] = 1
    blocks = torch.full((2, S), -1, dtype=torch.long)
    blocks[:, 40:75] = 0
    padding = torch.zeros(2, S, dtype=torch.bool)
    padding[1, -20:] = True
    return SequenceInfo(documents, blocks, padding)


def dense_picture(spec: MaskSpec, info: SequenceInfo, layout: Layout):
    """Block classes and rows sent straight from the dense mask, rows and columns in layout order."""
    order = layout.table(S)
    allowed = reference_mask(spec, info, 2, S)[:, order][:, :, order]
    blocks = allowed.view(2, S // BLOCK, BLOCK, S // BLOCK, BLOCK)
    full, some = blocks.all(4).all(2).all(0), blocks.any(4).any(2).any(0)
    classes = torch.where(full, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.int8)
    local = S // layout.world_size
    seen = allowed.any(0).view(layout.world_size, local, layout.world_size, local).any(1)  # [reader, owner, key]
    rows = seen.sum(-1).T.clone()  # [owner, reader]
    rows.fill_diagonal_(0)
    return classes, rows


@pytest.mark.parametrize("spec", [MaskSpec(causal=True), MaskSpec(causal=True, sliding_window=24),
                                  MaskSpec(causal=True, sliding_window=24, block_bidirectional=True),
                                  FLEX_MASKS["flex_global_window"](2, S), FLEX_MASKS["flex_block_diffusion"](2, S)],
                         ids=["causal", "sliding", "sliding_vision", "flex_global_window", "flex_block_diffusion"])
@pytest.mark.parametrize("kind, world_size", [("zigzag", 2), ("contiguous", 4), ("zigzag", 4)])
def test_the_picture_is_the_dense_mask_blocked(spec, kind, world_size):
    info, layout = packed_info(), Layout(kind, world_size)
    picture = mask_picture(spec, info, layout, S, BLOCK)
    classes, rows = dense_picture(spec, info, layout)
    assert torch.equal(picture.classes, classes)
    assert torch.equal(picture.rows_sent, rows)
    assert picture.rank_blocks == [r * S // BLOCK // world_size for r in range(world_size + 1)]
    for c in (FULL, PARTIAL):
        assert int(picture.pair_blocks[c].sum()) == int((classes == c).sum())


def test_the_command_prints_the_figures_and_draws_them(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plan.png"
    assert main(["--world-size", "2", "--seq-len", "1024", "--mask", "packed", "--packing", "long_four",
                 "--layout", "balanced", "--layer", "sliding", "--window", "64", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "balanced layout, P=2" in text and "rows received per rank" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flex", [[], ["--flex", "prefix_lm"]], ids=["maskspec", "flexmask"])
def test_the_command_prints_without_drawing(capsys, flex):
    assert main(["--world-size", "2", "--seq-len", "512", "--mask", "causal", "--output", "-", *flex]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["reader", "owner", "full", "partial", "rows"] and len(lines) == 2 + 4 + 1
    assert ("FlexMask(gemma4_flexring.presets.prefix_lm" in lines[0]) == bool(flex)
