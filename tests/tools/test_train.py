"""``python -m gemma4_flexring train``: real text packed into rows, trained on dp x cp spawned gloo
ranks, every step's loss against the same steps in one process; the packing; argument checks."""

from __future__ import annotations

import json

import pytest
import torch

from gemma4_flexring.tools import train


def _run(tmp_path, *argv: str) -> dict:
    out = tmp_path / "run.json"
    assert train.main([*argv, "--check", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_cp_training_follows_one_process_step_by_step(tmp_path, capsys):
    """Two CP ranks, zigzag: every step's loss and gradient norm (the ranks' shares summed) are one
    process's on the same rows, within CHECK_RTOL (float32), and the model learns."""
    run = _run(tmp_path, "--cp", "2", "--steps", "4", "--seq-len", "256", "--layout", "zigzag")
    losses, norms = [step["loss"] for step in run["steps"]], [step["grad_norm"] for step in run["steps"]]
    want, want_norms = run["check"]["one_process_losses"], run["check"]["one_process_grad_norms"]
    assert len(losses) == len(want) == 4
    for name, got, expected in (("loss", losses, want), ("grad_norm", norms, want_norms)):
        bound = train.CHECK_RTOL[name]
        assert all(abs(a - b) <= bound * abs(b) for a, b in zip(got, expected)), (name, got, expected)
    assert losses[-1] < losses[0]
    assert "OK: loss within" in capsys.readouterr().out


def test_data_times_context_parallel_training_follows_one_process(tmp_path):
    """dp 2 x cp 2 (4 ranks), balanced layouts, float64: each data-parallel group trains on its own
    rows, and the global batch's loss and gradient norm per step are one process's. The bound is
    1e-6, not float64's 1e-12: transformers keeps Gemma 4's RMSNorms and the loss's logits in float32
    even in a float64 model, which leaves a correct CP run about 1e-7 from one process (measured
    8.7e-8 on the loss here); a gradient scaled by dp or cp would be off by 0.5 or more."""
    run = _run(tmp_path, "--dp", "2", "--cp", "2", "--steps", "2", "--seq-len", "128", "--dtype", "float64")
    diffs = run["check"]["relative_differences"]
    assert len(diffs["loss"]) == len(diffs["grad_norm"]) == 2
    assert max(diffs["loss"] + diffs["grad_norm"]) <= 1e-6, diffs


def test_packing_restarts_positions_and_trains_no_document_on_the_next(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"abcdefg")
    (tmp_path / "b.txt").write_bytes(b"hij")
    (tmp_path / "c.txt").write_bytes(b"")
    rows = train.pack(train.corpus_files(tmp_path), rows=3, seq_len=4)
    assert rows.input_ids.flatten().tolist() == list(b"abcdefghijab")  # the corpus repeats when short
    assert rows.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]
    assert torch.equal(rows.labels == train.IGNORE_INDEX, rows.position_ids == 0)
    assert rows.targets() == sum(int((r[1:] != train.IGNORE_INDEX).sum()) for r in rows.labels)


@pytest.mark.parametrize("argv, message", [
    (["--cp", "2", "--seq-len", "102", "--layout", "zigzag"], "multiple of 4"),
    (["--dp", "0"], "--dp must be positive"),
    (["--compile", "--checkpointing"], "not supported"),
    (["--corpus", "/nonexistent/folder"], "--corpus must be a folder"),
])
def test_train_rejects_bad_arguments_before_spawning(capsys, argv, message):
    assert train.main(argv) == 2
    assert message in capsys.readouterr().out


def test_an_empty_corpus_is_refused_before_spawning(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert train.main(["--corpus", str(tmp_path)]) == 2
    assert "holds no bytes" in capsys.readouterr().out
