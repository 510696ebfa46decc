"""``python -m gemma4_flexring bench`` end to end on a small problem: its counts against the dense
reference, and both of its phases (timing and memory) report every figure."""

from __future__ import annotations

import json

import pytest
import torch

from gemma4_flexring.testing.cases import figure_info, figure_masks
from gemma4_flexring.testing.reference import reference_mask
from gemma4_flexring.tools.bench import main


def test_bench_counts_the_allowed_pairs_and_reports_every_figure(tmp_path, capsys):
    seq_len, out = 512, tmp_path / "figures.json"
    assert main(["--world-size", "1", "--seq-len", str(seq_len), "--heads", "2", "--kv-heads", "1",
                 "--mask", "causal", "sliding", "packed", "--window", "64", "--repeats", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())["figures"]
    assert [f["figure"] for f in figures] == ["causal", "sliding", "packed"]
    for f in figures:
        spec = figure_masks(f["figure"], 64, 0)[0][1]
        info = figure_info(f["figure"], 1, seq_len, 5)
        assert f["allowed_pairs"] == int(reference_mask(spec, info, 1, seq_len).sum())
        assert f["bytes_sent_per_rank_layer"] == 0 and f["bytes_ratio"] == 1.0  # one rank sends nothing
        assert f["step_s"] > 0 and f["baseline"] == "sdpa" and f["baseline_s"] > 0
        assert f["baseline_ratio_best"] > 0 and f["baseline_ratio_median"] > 0  # from steps taken in turns
        # The memory phase's rows (tiny problems may grow by no page at all, so no value is asserted).
        assert {"workspace_forward_bytes", "workspace_backward_bytes", "baseline_memory_ratio"} <= f.keys()
    table = capsys.readouterr().out
    assert "pair cost" in table and all(name in table for name in ("causal", "sliding", "packed"))


def test_bench_on_cuda_takes_one_rank(capsys):
    assert main(["--device", "cuda", "--world-size", "2"]) == 2
    assert "--device cuda runs one rank" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_cuda(tmp_path):
    out = tmp_path / "figures.json"
    assert main(["--device", "cuda", "--world-size", "1", "--seq-len", "2048", "--heads", "2", "--kv-heads", "1",
                 "--dtype", "bfloat16", "--mask", "causal", "sliding", "--repeats", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())["figures"]
    assert [(f["device"], f["kernel"]) for f in figures] == [("cuda", "flex")] * 2
    assert all(f["step_s"] > 0 and f["seconds_per_pair"] > 0 for f in figures)


def test_bench_runs_the_kernel_asked_for(tmp_path):
    """``--kernel flex`` on two ranks: flex's calls read whole key blocks, so a window of 64 rows
    sends a block of 128 (twice the bound, which counts rows); aten would send the bound exactly."""
    out = tmp_path / "figures.json"
    assert main(["--world-size", "2", "--seq-len", "512", "--heads", "2", "--kv-heads", "1", "--mask", "sliding",
                 "--window", "64", "--repeats", "1", "--no-baseline", "--kernel", "flex", "--json", str(out)]) == 0
    (figure,) = json.loads(out.read_text())["figures"]
    assert figure["kernel"] == "flex" and figure["bytes_ratio"] > 1


def test_bench_plans_ahead_off_the_step(tmp_path):
    """``--plan-ahead``: each step's batch is planned before the step, so the step plans nothing."""
    out = tmp_path / "figures.json"
    assert main(["--world-size", "2", "--seq-len", "512", "--heads", "2", "--kv-heads", "1", "--mask", "packed",
                 "--stack", "2", "--window", "64", "--repeats", "1", "--no-baseline", "--plan-ahead",
                 "--json", str(out)]) == 0
    (figure,) = json.loads(out.read_text())["figures"]
    assert figure["planning_s"] == 0 and figure["step_s"] > 0
