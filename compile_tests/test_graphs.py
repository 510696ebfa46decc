"""gemma4_flexring.tools.graphs and the ``graph`` command: structural graph pins, op calls, guards, recompiles.

The pins are structural (``graph_summary``): regenerate them with
``EXPECTTEST_ACCEPT=1 python -m pytest compile_tests/test_graphs.py``. The last tests prove that
they catch a graph break, a missing op call and a forward op recomputed in the backward.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re

import torch
import torch.nn.functional as F
from expecttest import TestCase
from torch.utils.checkpoint import checkpoint

from gemma4_flexring import SequenceInfo
from gemma4_flexring.tools.compile_log import capture_guards
from gemma4_flexring.tools.graph import main
from gemma4_flexring.tools.graphs import compile_batches, compiled_graphs, graph_summary, ring_op_calls
from gemma4_flexring.testing.model import Gemma4Attention
from gemma4_flexring.testing.compiled import attend

RING_OP = torch.ops.gemma4_flexring.ring_attention.default


def _qkv(seq_len: int = 16, requires_grad: bool = True):
    return tuple(torch.randn(1, h, seq_len, 8, requires_grad=requires_grad) for h in (4, 2, 2))


def _documents(seq_len: int = 16) -> SequenceInfo:
    return SequenceInfo(document_ids=(torch.arange(seq_len) // 5).view(1, -1))


def _run_cli(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    assert code == 0
    return out.getvalue()


class TestGraphSummary(TestCase):
    def test_function_with_metadata(self):
        """Dynamic sizes; the metadata and the generation are graph inputs, not constants."""
        graphs = compiled_graphs(attend, *_qkv(), _documents())
        self.assertExpectedInline(graph_summary(graphs), """\
inputs: s0, s1, s2, f32[1, s0, s1, s2], s3, f32[1, s3, s1, s2], f32[1, s3, s1, s2], i64[1, s1], i64[1, s1], b8[1, s1], i64[]
forward:
  arange
  ring_attention(q=f32[1, s0, s1, s2], k=f32[1, s3, s1, s2], v=f32[1, s3, s1, s2], generation=i64[], document_ids=i64[1, s1], block_ids=i64[1, s1], padding=b8[1, s1], layout=arange, mask_tensors=[], causal=True, sliding_window=4, block_bidirectional=False, group_name='', scale=1.0, kernel_name='', mask_name='', mask_generation=None)
  detach
backward:
  detach
  ring_attention_backward(grad_out=f32[1, s0, s1, s2], q=f32[1, s0, s1, s2], k=f32[1, s3, s1, s2], v=f32[1, s3, s1, s2], out=detach, lse=f64[1, s0, s1], generation=i64[], document_ids=i64[1, s1], block_ids=i64[1, s1], padding=b8[1, s1], layout=i64[s1], mask_tensors=[], causal=True, sliding_window=4, block_bidirectional=False, group_name='', scale=1.0, kernel_name='', mask_name='', mask_generation=None)
""")

    def test_function_without_metadata_static(self):
        """Forward only (no input requires grad), static sizes: no backward graph."""
        graphs = compiled_graphs(attend, *_qkv(requires_grad=False), dynamic=False)
        self.assertExpectedInline(graph_summary(graphs), """\
inputs: f32[1, 4, 16, 8], f32[1, 2, 16, 8], f32[1, 2, 16, 8]
forward:
  zeros
  full
  zeros
  new_generation(like=zeros)
  arange
  ring_attention(q=f32[1, 4, 16, 8], k=f32[1, 2, 16, 8], v=f32[1, 2, 16, 8], generation=new_generation, document_ids=zeros, block_ids=full, padding=zeros, layout=arange, mask_tensors=[], causal=True, sliding_window=4, block_bidirectional=False, group_name='', scale=1.0, kernel_name='', mask_name='', mask_generation=None)
""")
        self.assertIsNone(graphs.backward)

    def test_module(self):
        """A Gemma 4 attention layer: the op is called once forward, its backward once backward."""
        torch.manual_seed(0)
        layer = Gemma4Attention()
        hidden = torch.randn(2, 16, 32, requires_grad=True)
        info = SequenceInfo(document_ids=(torch.arange(16) // 5).expand(2, -1))
        graphs = compiled_graphs(layer, hidden, info=info)
        ring_lines = [line for line in graph_summary(graphs).splitlines() if "ring_attention" in line]
        self.assertExpectedInline("\n".join(ring_lines), """\
  ring_attention(q=transpose, k=transpose, v=transpose, generation=i64[], document_ids=i64[s0, s1], block_ids=i64[s0, s1], padding=b8[s0, s1], layout=arange, mask_tensors=[], causal=True, sliding_window=8, block_bidirectional=True, group_name='', scale=1.0, kernel_name='', mask_name='', mask_generation=None)
  ring_attention_backward(grad_out=transpose, q=f32[s0, 4, s1, 8], k=f32[s0, 2, s1, 8], v=f32[s0, 2, s1, 8], out=detach, lse=f64[s0, 4, s1], generation=i64[], document_ids=i64[s0, s1], block_ids=i64[s0, s1], padding=b8[s0, s1], layout=i64[s1], mask_tensors=[], causal=True, sliding_window=8, block_bidirectional=True, group_name='', scale=1.0, kernel_name='', mask_name='', mask_generation=None)""")
        self.assertIsNone(hidden.grad)  # the caller's tensors are left alone

    def test_op_calls_name_every_schema_argument(self):
        graphs = compiled_graphs(attend, *_qkv(), _documents())
        (call,) = ring_op_calls(graphs.forward)
        names = [a.name for a in RING_OP._schema.arguments]
        self.assertEqual([part.split("=")[0] for part in call[len("ring_attention("):-1].split(", ")], names)

    def test_symbols_renumbered_in_order_of_first_appearance(self):
        summary = graph_summary(compiled_graphs(attend, *_qkv(), _documents()))
        symbols = list(dict.fromkeys(re.findall(r"\bs\d+\b", summary)))
        self.assertEqual(symbols, [f"s{i}" for i in range(len(symbols))])


class TestPinsCatchRegressions(TestCase):
    """Each regression the pins exist for either raises or changes the summary of ``attend``."""

    def test_graph_break_raises(self):
        def broken(q, k, v, info):
            out = attend(q, k, v, info)
            torch._dynamo.graph_break()
            return out * 2

        with self.assertRaises(torch._dynamo.exc.Unsupported):
            compiled_graphs(broken, *_qkv(), _documents())

    def test_missing_op_changes_the_summary(self):
        def without_op(q, k, v, info):
            return F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), scale=1.0)

        want = graph_summary(compiled_graphs(attend, *_qkv(), _documents()))
        got = graph_summary(compiled_graphs(without_op, *_qkv(), _documents()))
        self.assertNotEqual(got, want)
        self.assertNotIn("ring_attention(", got)

    def test_recompute_in_backward_changes_the_summary(self):
        def recomputed(q, k, v, info):
            return checkpoint(attend, q, k, v, info, use_reentrant=False)

        want = graph_summary(compiled_graphs(attend, *_qkv(), _documents()))
        got = graph_summary(compiled_graphs(recomputed, *_qkv(), _documents()))
        self.assertNotEqual(got, want)
        self.assertNotIn("ring_attention(", want.split("backward:")[1])
        self.assertIn("ring_attention(", got.split("backward:")[1])


class TestGuardsAndRecompiles(TestCase):
    def test_dropping_the_sequence_info_recompiles_with_reason(self):
        batches = [(_qkv(n), {"info": info}) for n, info in ((16, _documents(16)), (24, _documents(24)), (20, None))]
        compiles = compile_batches(attend, batches)
        self.assertEqual([c.batch for c in compiles], [0, 2])  # a new length alone does not recompile
        self.assertIsNone(compiles[0].reason)
        self.assertIn("kwargs['info']", compiles[1].reason)  # the SequenceInfo that went missing
        guards = [g.code for g in compiles[0].input_guards()]
        # Every metadata field is a tensor whatever the batch holds: guarded as a tensor, never on None.
        self.assertTrue(any(code.startswith("check_tensor(L['kwargs']['info'].padding") for code in guards), guards)
        self.assertFalse(any("is None" in code for code in guards), guards)
        self.assertTrue(all("L['args']" in code or "L['kwargs']" in code or "==" in code for code in guards), guards)

    def test_static_length_change_recompiles(self):
        batches = [(_qkv(16), {}), (_qkv(24), {})]
        compiles = compile_batches(attend, batches, dynamic=False)
        self.assertEqual(len(compiles), 2)
        self.assertIn("size mismatch", compiles[1].reason)

    def test_capture_restores_the_logger(self):
        log = logging.getLogger("torch._dynamo.guards.__guards")
        before = log.level, log.propagate, list(log.handlers)
        with capture_guards():
            pass
        self.assertEqual((log.level, log.propagate, list(log.handlers)), before)


class TestCli(TestCase):
    def test_builtin_model(self):
        """Four batches: a second length and another metadata pattern reuse the code, a call
        without a SequenceInfo recompiles."""
        text = _run_cli()
        lines = text.splitlines()
        self.assertEqual(lines[1], "frames compiled: 2 over 4 batches")
        self.assertRegex(lines[2], r"^batch 0 .*: compiled \d+/0$")
        self.assertRegex(lines[3], r"^batch 1 .*: reused the compiled code$")
        self.assertRegex(lines[4], r"^batch 2 .*: reused the compiled code$")
        self.assertRegex(lines[5], r"^batch 3 .*: recompiled \d+/1, failed guard\(s\):$")
        self.assertIn("kwargs['info']", lines[6])
        self.assertEqual(text.count("class GraphModule(torch.nn.Module):"), 4)
        self.assertEqual(text.count("  forward: ring_attention(q=transpose, "), 2)
        self.assertEqual(text.count("  backward: ring_attention_backward(grad_out="), 2)
        self.assertNotIn("True, 8, True", text)  # no positional option tuples

    def test_user_factory_static_forward_only(self):
        text = _run_cli("--model", "gemma4_flexring.testing.compiled:attend_example", "--static", "--forward-only")
        self.assertIn("frames compiled: 2 over 2 batches", text)
        self.assertIn("size mismatch", text)
        self.assertNotIn("# backward", text)
        self.assertNotIn("ring_attention_backward", text)

    def test_bad_factory_is_a_usage_error(self):
        with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            main(["--model", "gemma4_flexring.testing.model"])
