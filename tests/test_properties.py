"""Property test: random small problems (shapes, GQA, world sizes 1-4, contiguous, zigzag and balanced layouts, documents,
image blocks, padding, windows, causal or not, block_bidirectional, block sizes) give the float64
dense reference's output and gradients.

Each hypothesis example is a batch of problems, sent to the gloo workers in one call per world
size: spawning or calling the workers per problem would dominate the run time.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gemma4_flexring import MaskSpec
from gemma4_flexring.testing.tolerances import RING
from gemma4_flexring.testing.workers import Example, run_examples

PROBLEMS_PER_EXAMPLE = 10
MAX_SEQ_LEN = 40


def _runs_to_ids(draw, batch: int, seq_len: int, max_runs: int, base: torch.Tensor) -> torch.Tensor:
    """[B, S] ids: ``base`` with up to ``max_runs`` random runs per row set to 0, 1, ..."""
    ids = base.clone()
    for b in range(batch):
        runs = draw(st.lists(st.tuples(st.integers(0, seq_len - 1), st.integers(1, 12)), max_size=max_runs))
        for index, (start, length) in enumerate(runs):
            ids[b, start:start + length] = index
    return ids


@st.composite
def problems(draw) -> Example:
    world_size = draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["contiguous", "zigzag", "balanced"]))
    pieces = world_size * (2 if layout == "zigzag" else 1)
    seq_len = pieces * draw(st.integers(1, MAX_SEQ_LEN // pieces))
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    causal = draw(st.booleans())
    window = draw(st.none() | st.integers(1, seq_len))
    mask = MaskSpec(causal=causal, sliding_window=window, block_bidirectional=draw(st.booleans()))
    documents = blocks = padding = None
    if draw(st.booleans()):
        starts = torch.zeros(batch, seq_len, dtype=torch.long)
        for b in range(batch):
            for cut in draw(st.lists(st.integers(1, seq_len), max_size=4)):
                if cut < seq_len:
                    starts[b, cut] = 1
        documents = starts.cumsum(-1)
    if draw(st.booleans()):
        blocks = _runs_to_ids(draw, batch, seq_len, 3, torch.full((batch, seq_len), -1, dtype=torch.long))
    if draw(st.booleans()):
        padding = torch.zeros(batch, seq_len, dtype=torch.bool)
        for b in range(batch):
            padding[b, draw(st.lists(st.integers(0, seq_len - 1), max_size=4))] = True
            padding[b, seq_len - draw(st.integers(0, seq_len // 2)):] = True  # a padded tail (possibly empty)
    return Example(
        world_size=world_size, layout=layout, batch=batch, q_heads=kv_heads * draw(st.integers(1, 3)),
        kv_heads=kv_heads, head_dim=draw(st.sampled_from([1, 4, 8, 16])), seq_len=seq_len, mask=mask,
        document_ids=documents, block_ids=blocks, padding=padding,
        scale=draw(st.sampled_from([None, 1.0, 0.3])), block_size=draw(st.sampled_from([4, 8, 128])),
        seed=draw(st.integers(0, 2**16)), piece_rows=draw(st.sampled_from([None, 3, 7, 16])))


@settings(max_examples=4, deadline=None, derandomize=True, database=None,
          phases=(Phase.explicit, Phase.generate),  # no shrinking: each step costs ring runs; failures name the problem
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(examples=st.lists(problems(), min_size=PROBLEMS_PER_EXAMPLE, max_size=PROBLEMS_PER_EXAMPLE))
def test_ring_matches_dense_reference(cluster, examples):
    by_size: dict[int, list[Example]] = defaultdict(list)
    for example in examples:
        by_size[example.world_size].append(example)
    failures = []
    for world_size, group in by_size.items():
        if world_size == 1:
            results = [run_examples(0, 1, group)]
        else:
            results = cluster(world_size).run(run_examples, group)
        for index, example in enumerate(group):
            sharding = example.make_layout()
            for part, (name, want) in enumerate(zip(("out", "dq", "dk", "dv"), example.reference())):
                got = sharding.unshard([results[r][index][part] for r in range(world_size)], dim=2)
                err = (got - want).abs().max().item()
                if not err <= RING[torch.float64]:
                    failures.append(f"{name}: max error {err:.3g} for {example}")
    assert not failures, "\n".join(failures)
