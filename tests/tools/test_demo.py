"""``python -m gemma4_flexring demo``: end to end on 2 spawned gloo ranks, and its argument checks."""

from __future__ import annotations

import pytest
import torch

from gemma4_flexring.testing.tolerances import TRANSFORMERS_COMPILED
from gemma4_flexring.tools import demo


def test_demo_passes_and_reports(capsys):
    # backend "eager": dynamo's fullgraph capture without AOT compilation, to keep the suite fast.
    assert demo.main(["--world-size", "2", "--seq-len", "64", "--backend", "eager"]) == 0
    report = capsys.readouterr().out
    for expected in ("2 ranks (gloo, cpu), balanced layout", "1 frame(s) for 2 steps (new metadata each step; no recompile)", "MB sent", "ring steps",
                     "parity:", "OK"):
        assert expected in report, report


@pytest.mark.parametrize("argv, message", [
    (["--seq-len", "66", "--layout", "zigzag"], "multiple of 4"),
    (["--world-size", "4", "--seq-len", "66"], "multiple of 4"),
    (["--world-size", "3", "--seq-len", "64", "--layout", "contiguous"], "multiple of 3"),
    (["--seq-len", "16"], "at least 32"),
    (["--world-size", "0"], "positive"),
])
def test_demo_rejects_bad_arguments_before_spawning(capsys, argv, message):
    assert demo.main(argv) == 2
    assert message in capsys.readouterr().out


def test_parity_fails_beyond_tolerance_or_on_missing_gradients():
    ok = demo.Parity(logits=0.0, loss=1e-7, grads=2e-7, missing=())
    assert ok.ok
    assert not demo.Parity(0.0, 0.0, 10 * TRANSFORMERS_COMPILED, ()).ok
    assert not demo.Parity(0.0, 0.0, 0.0, ("lm_head.weight",)).ok
    assert ok.worst(demo.Parity(1.0, 0.0, 0.0, ())).logits == 1.0


def test_demo_batch_contents_and_new_metadata_each_step():
    batch = demo.demo_batch(64, step=0, device=torch.device("cpu"))
    assert batch.describe() == "2 rows x 64 tokens: 5 packed documents, 2 image blocks, 4 padding tokens"
    assert not torch.equal(batch.position_ids, demo.demo_batch(64, step=1, device=torch.device("cpu")).position_ids)
