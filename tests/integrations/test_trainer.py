"""``hf.RingTrainer`` (transformers' ``Trainer`` with the ring) on gloo ranks, against a stock
``Trainer`` in one process on the same rows: every logged loss and grad_norm, the final parameters
and the evaluation loss, over 5 AdamW steps on packed rows; and what the trainer refuses.

A CP group that read another group's rows, a loss scaled by 1/cp, or a count of targets taken per
rank would each show in the logged losses or grad_norms (AdamW alone would hide a gradient scaled
by 1/2 in the parameters).
"""

from __future__ import annotations

import re

import pytest

from gemma4_flexring.testing.tolerances import TRAINER
from gemma4_flexring.testing.trainers import (TrainerSetup, parallelism_config_groups, run_trainer,
                                              trainer_refusal)


def relative(got: float, want: float) -> float:
    return abs(got - want) / abs(want)


def assert_trains_as_one_process(cluster, setup: TrainerSetup, output_dir) -> None:
    want = run_trainer(0, 1, setup.one_process(), str(output_dir))
    assert len(want.losses) == setup.steps
    bounds = TRAINER["trl" if setup.trainer == "sft" else setup.dtype]
    for rank, got in enumerate(cluster(setup.dp * setup.cp).run(run_trainer, setup, str(output_dir))):
        losses = [relative(g, w) for g, w in zip(got.losses, want.losses, strict=True)]
        assert max(losses) <= bounds["loss"], (rank, losses)
        assert relative(got.eval_loss, want.eval_loss) <= bounds["loss"], rank
        if "grad_norm" in bounds:
            norms = [relative(g, w) for g, w in zip(got.grad_norms, want.grad_norms, strict=True)]
            assert max(norms) <= bounds["grad_norm"], (rank, norms)
            diff = sum(((got.params[n] - p) ** 2).sum() for n, p in want.params.items()) ** 0.5
            norm = sum((p ** 2).sum() for p in want.params.values()) ** 0.5
            assert diff / norm <= bounds["params"], rank


@pytest.mark.parametrize("setup", [
    TrainerSetup(cp=2, accumulation=1),
    TrainerSetup(cp=2, accumulation=2, layout="zigzag", seq_len=46),  # rows padded to 48
    TrainerSetup(dp=2, cp=2, accumulation=2, layout="contiguous", iterable=True),
    TrainerSetup(dp=2, cp=2, model="conditional"),
    TrainerSetup(cp=2, accumulation=2, dtype="float32"),
], ids=["cp2", "cp2-accumulation-padded-zigzag", "dp2xcp2-accumulation-iterable", "dp2xcp2-conditional",
        "cp2-float32-accumulation"])
def test_ring_trainer_trains_as_one_process(cluster, tmp_path, setup):
    assert_trains_as_one_process(cluster, setup, tmp_path)


def test_trl_sft_trainer_with_the_mixin_trains_as_one_process(cluster, tmp_path):
    """``class RingSFTTrainer(hf.RingTrainerMixin, SFTTrainer)``, ``padding_free=True``: each
    micro-batch's documents in one row (``position_ids`` restarts, ``cu_seq_lens_*`` dropped), of a
    length that changes from batch to batch (padded where the layout needs it)."""
    pytest.importorskip("trl")
    assert_trains_as_one_process(cluster, TrainerSetup(dp=2, cp=2, accumulation=2, batch=2, trainer="sft"), tmp_path)


@pytest.mark.parametrize("what, message", [
    ("label_smoothing", "label smoothing"),
    ("compute_loss_func", "compute_loss_func is not supported"),
    ("compute_metrics", "compute_metrics / preprocess_logits_for_metrics are not supported"),
    ("cp_size", "cp_size=3 does not divide the world size 2"),
    ("layout", "layout must be one of"),
    ("accelerate_world", "accelerate runs 1 process\\(es\\) but torch.distributed has 2"),
    ("images", r"cannot shard the batch's \['pixel_values'\]"),
    ("predict", "predictions \\(logits\\) are not gathered"),
])
def test_what_it_cannot_honour_raises_on_every_rank(cluster, tmp_path, what, message):
    errors = cluster(2).errors(trainer_refusal, TrainerSetup(cp=2, steps=1), str(tmp_path), what)
    assert [name for name, _ in errors] == ["ValueError"] * 2, errors
    assert all(re.search(message, text) for _, text in errors), errors


def test_with_an_accelerate_parallelism_config_it_trains_as_one_process(cluster, tmp_path):
    """``args.parallelism_config = ParallelismConfig(cp_size=2, dp_shard_size=2)`` and no
    ``cp_size``: the CP groups are the mesh's "cp" dimension, and accelerate's own CP hook (which
    refuses Gemma 4) stays off the model. On CPU ranks DDP stands in for FSDP2
    (``accelerate_cp_on_cpu``)."""
    assert_trains_as_one_process(cluster, TrainerSetup(dp=2, cp=2, accumulation=2, parallelism=True), tmp_path)


def test_a_batch_one_data_group_cannot_shard_raises_on_every_rank(cluster, tmp_path):
    """dp2 x cp2, image batches on the second data group only: all four ranks raise (the first
    data group would otherwise wait for the second in the gradients' reduction)."""
    errors = cluster(4).errors(trainer_refusal, TrainerSetup(dp=2, cp=2, steps=1), str(tmp_path),
                               "images_one_data_group")
    assert [name for name, _ in errors] == ["ValueError"] * 4, errors
    assert all("rank 2: cannot shard the batch's ['pixel_values']" in text for _, text in errors), errors


def test_an_accelerate_parallelism_config_gives_the_cp_groups(cluster):
    """With ``args.parallelism_config`` (accelerate's mesh, "cp" innermost) the trainer's CP groups
    are the mesh's; a ``cp_size`` that is not the config's is refused."""
    groups = cluster(4).run(parallelism_config_groups, 2, 2, None)
    assert groups == [([0, 1], 0, 0, 2), ([0, 1], 1, 0, 2), ([2, 3], 0, 1, 2), ([2, 3], 1, 1, 2)]
    errors = cluster(4).errors(parallelism_config_groups, 2, 2, 4)
    assert errors == [("ValueError", "RingTrainer: cp_size=4 but args.parallelism_config.cp_size=2; "
                                     "give one of them (or the same size)")] * 4
