"""torch.export of a Gemma 4 attention layer (projections + ring_attention), sequence length dynamic."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim, ShapesCollection

from gemma4_flexring import SequenceInfo, mask_cache_info
from gemma4_flexring.testing.model import Gemma4Attention
from gemma4_flexring.testing.cases import training_info
from gemma4_flexring.testing.compiled import make_hidden

OP = "torch.ops.gemma4_flexring.ring_attention.default"


def _export(layer, with_info: bool, strict: bool):
    hidden = make_hidden(16, dtype=torch.float64)
    seq = Dim("seq", min=4, max=4096)
    shapes = ShapesCollection()
    shapes[hidden] = {1: seq}
    kwargs = {}
    if with_info:
        info = training_info(16)
        for t in info.tensors():
            shapes[t] = {1: seq}
        kwargs["info"] = info
    return torch.export.export(layer, (hidden,), kwargs, dynamic_shapes=shapes, strict=strict)


def _step(module, seq_len: int, with_info: bool):
    """Output and gradients (input first, then parameters by name) of one forward + backward."""
    hidden = make_hidden(seq_len, dtype=torch.float64).requires_grad_(True)
    out = module(hidden, info=training_info(seq_len)) if with_info else module(hidden)
    names, params = zip(*sorted(module.named_parameters()))
    grads = torch.autograd.grad(out.pow(2).sum(), [hidden, *params])
    return out, dict(zip(("hidden", *names), grads))


@pytest.mark.parametrize("with_info", [True, False], ids=["info", "no_info"])
@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_export_save_load(tmp_path, with_info, strict):
    """Exported once at length 16, the program (and its save/load round trip) runs at other
    lengths, matches eager forward and backward, and shows the op with a symbolic length."""
    torch.manual_seed(0)
    layer = Gemma4Attention().double()
    program = _export(layer, with_info, strict)
    code = program.graph_module.code
    assert code.count(OP) == 1
    assert any(str(r.upper) == "4096" for r in program.range_constraints.values())

    path = tmp_path / "layer.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    assert loaded.graph_module.code.count(OP) == 1

    for seq_len in (12, 40, 64):
        want = _step(layer, seq_len, with_info)
        for module in (program.module(), loaded.module()):
            torch.testing.assert_close(_step(module, seq_len, with_info), want, rtol=1e-12, atol=1e-12)


def test_exported_program_uses_each_calls_generation():
    """The generation is a graph input of the exported program, not a constant: a new
    SequenceInfo of the same shape but other content builds new masks and gives its own result."""
    torch.manual_seed(0)
    layer = Gemma4Attention().double()
    module = _export(layer, True, False).module()
    hidden = make_hidden(24, dtype=torch.float64)
    first, second = training_info(24), training_info(24)
    second.document_ids.fill_(0)
    second = SequenceInfo(second.document_ids, second.block_ids, second.padding)  # fresh generation
    for info in (first, second):
        builds = mask_cache_info().builds
        torch.testing.assert_close(module(hidden, info=info), layer(hidden, info=info), rtol=1e-12, atol=1e-12)
        assert mask_cache_info().builds == builds + 1
        assert mask_cache_info().generation == int(info.generation)


class _PackedLayer(torch.nn.Module):
    """Builds its SequenceInfo inside forward, from position restarts."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = Gemma4Attention().double()

    def forward(self, hidden, position_ids):
        return self.layer(hidden, info=SequenceInfo.from_hf(position_ids=position_ids))


def _restarts(seq_len: int, cut: int) -> torch.Tensor:
    return torch.cat([torch.arange(cut), torch.arange(seq_len - cut)]).view(1, -1).expand(2, -1)


def test_metadata_built_inside_an_exported_program_is_never_stale(tmp_path):
    """The generation is made by an op at run time, never a lifted constant: two loads of the
    program, batches of one shape with different documents, each gets its own masks."""
    torch.manual_seed(0)
    module = _PackedLayer()
    seq = Dim("seq", min=4, max=4096)
    hidden, positions = make_hidden(16, dtype=torch.float64), _restarts(16, 5)
    program = torch.export.export(module, (hidden, positions), dynamic_shapes=({1: seq}, {1: seq}))
    assert "gemma4_flexring.new_generation" in program.graph_module.code
    torch.export.save(program, tmp_path / "packed.pt2")
    loaded = [torch.export.load(tmp_path / "packed.pt2").module() for _ in range(2)]
    hidden = make_hidden(24, dtype=torch.float64)
    for cut in (3, 11, 17, 3):
        want = module(hidden, _restarts(24, cut))
        for copy in loaded:
            torch.testing.assert_close(copy(hidden, _restarts(24, cut)), want, rtol=1e-12, atol=1e-12)
