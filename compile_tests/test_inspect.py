"""gemma4_flexring.inspect: the compiled forward and backward graphs, pinned with expecttest.

Regenerate the expected text with ``EXPECTTEST_ACCEPT=1 python -m pytest compile_tests/test_inspect.py``.
"""

from __future__ import annotations

import contextlib
import io

import torch
from expecttest import TestCase

from gemma4_flexring import SequenceInfo
from gemma4_flexring.inspect import Gemma4Attention, compiled_graphs, main

from .compile_cases import attend


def _qkv(seq_len: int = 16):
    return tuple(torch.randn(1, h, seq_len, 8, requires_grad=True) for h in (4, 2, 2))


def _op_lines(text: str) -> str:
    return "\n".join(line.strip() for line in text.splitlines() if "gemma4_flexring" in line)


class TestGraphs(TestCase):
    def test_function_with_metadata(self):
        """Dynamic sizes; the metadata and the generation are graph inputs, not constants."""
        info = SequenceInfo(document_ids=(torch.arange(16) // 5).view(1, -1))
        graphs = compiled_graphs(attend, *_qkv(), info)
        self.assertExpectedInline(graphs.forward, """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "Sym(s21)", primals_2: "Sym(s25)", primals_3: "Sym(s63)", primals_4: "f32[1, s21, s25, s63]", primals_5: "Sym(s12)", primals_6: "f32[1, s12, s25, s63]", primals_7: "f32[1, s12, s25, s63]", primals_8: "i64[1, s25]", primals_9: "i64[]"):
        ring_attention = torch.ops.gemma4_flexring.ring_attention.default(primals_4, primals_6, primals_7, primals_9, primals_8, None, None, True, 4, False, 'contiguous', '', 1.0)
        getitem: "f32[1, s21, s25, s63]" = ring_attention[0]
        getitem_1: "f64[1, s21, s25]" = ring_attention[1];  ring_attention = None
        detach: "f32[1, s21, s25, s63]" = torch.ops.aten.detach.default(getitem)
        return (getitem, primals_4, primals_6, primals_7, primals_8, primals_9, getitem_1, detach, primals_1, primals_2, primals_3, primals_5)
""")
        self.assertExpectedInline(graphs.backward, """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "Sym(s21)", primals_2: "Sym(s25)", primals_3: "Sym(s63)", primals_5: "Sym(s12)", primals_4: "f32[1, s21, s25, s63]", primals_6: "f32[1, s12, s25, s63]", primals_7: "f32[1, s12, s25, s63]", primals_8: "i64[1, s25]", primals_9: "i64[]", getitem_1: "f64[1, s21, s25]", detach: "f32[1, s21, s25, s63]", tangents_1: "f32[1, s21, s25, s63]"):
        detach_1: "f32[1, s21, s25, s63]" = torch.ops.aten.detach.default(detach);  detach = None
        ring_attention_backward = torch.ops.gemma4_flexring.ring_attention_backward.default(tangents_1, primals_4, primals_6, primals_7, detach_1, getitem_1, primals_9, primals_8, None, None, True, 4, False, 'contiguous', '', 1.0);  tangents_1 = primals_4 = primals_6 = primals_7 = detach_1 = getitem_1 = primals_9 = primals_8 = None
        getitem_2: "f32[1, s21, s25, s63]" = ring_attention_backward[0]
        getitem_3: "f32[1, s12, s25, s63]" = ring_attention_backward[1]
        getitem_4: "f32[1, s12, s25, s63]" = ring_attention_backward[2];  ring_attention_backward = None
        return (None, None, None, getitem_2, None, getitem_3, getitem_4, None, None)
""")

    def test_function_without_metadata_static(self):
        """Forward only (no input requires grad), static sizes: no backward graph."""
        graphs = compiled_graphs(attend, *(t.detach() for t in _qkv()), dynamic=False)
        self.assertExpectedInline(graphs.forward, """\
class GraphModule(torch.nn.Module):
    def forward(self, arg0_1: "f32[1, 4, 16, 8]", arg1_1: "f32[1, 2, 16, 8]", arg2_1: "f32[1, 2, 16, 8]", arg3_1: "i64[]"):
        ring_attention = torch.ops.gemma4_flexring.ring_attention.default(arg0_1, arg1_1, arg2_1, arg3_1, None, None, None, True, 4, False, 'contiguous', '', 1.0);  arg0_1 = arg1_1 = arg2_1 = arg3_1 = None
        getitem: "f32[1, 4, 16, 8]" = ring_attention[0];  ring_attention = None
        return (getitem,)
""")
        self.assertIsNone(graphs.backward)

    def test_module(self):
        """A Gemma 4 attention layer: the op is called once forward, its backward once backward."""
        torch.manual_seed(0)
        layer = Gemma4Attention()
        hidden = torch.randn(2, 16, 32, requires_grad=True)
        info = SequenceInfo(document_ids=(torch.arange(16) // 5).expand(2, -1))
        graphs = compiled_graphs(layer, hidden, info=info)
        self.assertExpectedInline(_op_lines(graphs.forward), """ring_attention = torch.ops.gemma4_flexring.ring_attention.default(transpose, transpose_1, transpose_2, primals_14, primals_13, None, None, True, 8, True, 'contiguous', '', 1.0)""")
        self.assertExpectedInline(_op_lines(graphs.backward), """ring_attention_backward = torch.ops.gemma4_flexring.ring_attention_backward.default(transpose_4, transpose, transpose_1, transpose_2, detach_1, getitem_5, primals_14, primals_13, None, None, True, 8, True, 'contiguous', '', 1.0);  transpose_4 = transpose = transpose_1 = transpose_2 = detach_1 = getitem_5 = primals_14 = primals_13 = None""")
        self.assertIsNone(hidden.grad)  # the caller's tensors are left alone

    def test_cli(self):
        """``python -m gemma4_flexring graph`` prints both graphs of the small layer."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["--seq-len", "12", "--sliding-window", "4"])
        self.assertEqual(code, 0)
        text = out.getvalue()
        self.assertEqual(text.count("class GraphModule(torch.nn.Module):"), 2)
        self.assertExpectedInline(text.splitlines()[0] + "\n" + _op_lines(text), """\
# Gemma 4 attention layer, sliding (window 4), seq_len 12, 2 document(s), dynamic shapes
ring_attention = torch.ops.gemma4_flexring.ring_attention.default(transpose, transpose_1, transpose_2, primals_13, primals_12, None, None, True, 4, True, 'contiguous', '', 1.0)
ring_attention_backward = torch.ops.gemma4_flexring.ring_attention_backward.default(transpose_4, transpose, transpose_1, transpose_2, detach_1, getitem_5, primals_13, primals_12, None, None, True, 4, True, 'contiguous', '', 1.0);  transpose_4 = transpose = transpose_1 = transpose_2 = detach_1 = getitem_5 = primals_13 = primals_12 = None""")
