"""``python -m gemma4_flexring selfcheck --quick`` on the CPU: every section runs and passes."""

from __future__ import annotations

import json

from gemma4_flexring.__main__ import main


def test_selfcheck_quick_on_cpu(capsys):
    assert main(["selfcheck", "--quick", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["kernel"] == "aten"
    assert {(r["head_dim"], r["dtype"]) for r in report["parity"]} == {
        (d, t) for d in (64, 256, 512) for t in ("bfloat16", "float32")}
    assert {r["feature"] for r in report["parity"]} == {
        "causal", "sliding", "bidirectional", "bidirectional_window", "vision", "documents", "padding", "all"}
    assert {r["world_size"] for r in report["multi_rank"]} == {2} and report["runner"] == "simulated"
    assert report["compile_export"]["ok"]
    assert all(r["ring_tflops"] > 0 and r["sdpa_tflops"] > 0 for r in report["speed"])
