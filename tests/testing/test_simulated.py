"""The simulated ring: every rank a thread of this process, one device, same op and numbers."""

from __future__ import annotations

import threading

import pytest
import torch

from gemma4_flexring import Layout, ops, ring_attention
from gemma4_flexring.testing import simulated
from gemma4_flexring.testing.simulated import SimulatedGroup
from gemma4_flexring.testing.cases import SPECS, Case, make_info, make_tensors
from gemma4_flexring.testing.tolerances import RING
from gemma4_flexring.testing.workers import reference

CASES = [Case(spec, "all") for spec in SPECS] + [Case("sliding_vision", "packed_padded", torch.float32),
                                                 Case("causal", "none", q_heads=6, kv_heads=1)]


def _rank_step(group: SimulatedGroup, case: Case, layout: Layout):
    q, k, v, grad = make_tensors(case)
    info = make_info(case.info, case.batch, case.seq_len)

    def step(rank: int, world_size: int):
        local = [layout.shard(t, 2, rank).clone().requires_grad_(True) for t in (q, k, v)]
        out = ring_attention(*local, mask=case.mask, info=info, layout=layout, group=group, scale=case.scale)
        out.backward(layout.shard(grad, 2, rank))
        return (out.detach(), *(t.grad for t in local))

    return step


@pytest.mark.parametrize("layout_kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_simulated_ring_matches_dense_reference(world_size, layout_kind):
    group = SimulatedGroup(world_size)
    layout = Layout(layout_kind, world_size)
    failures = []
    for case in CASES:
        results = group.run(_rank_step(group, case, layout))
        for part, (name, want) in enumerate(zip(("out", "dq", "dk", "dv"), reference(case))):
            got = layout.unshard([r[part] for r in results], dim=2)
            err = (got.double() - want).abs().max().item()
            if not err <= RING[case.dtype]:
                failures.append(f"{case} {name}: {err:.3g}")
    assert not failures, "\n".join(failures)


def test_ranks_that_disagree_raise_together():
    group = SimulatedGroup(2)
    q, k, v, _ = make_tensors(Case("causal", "none", seq_len=16))

    def step(rank: int, world_size: int):
        layout = Layout("contiguous", 2)
        mine = [layout.shard(t, 2, rank) for t in (q, k, v)]
        return ring_attention(*mine, mask=SPECS["sliding"] if rank else SPECS["causal"], layout=layout, group=group)

    with pytest.raises(RuntimeError) as failure:
        group.run(step)
    assert failure.value.args[0].count("ranks disagree on sliding_window") == 2  # both ranks raised it


def test_a_rank_failing_after_the_agreement_fails_its_peers_at_once(monkeypatch):
    """Rank 1 raises after the ranks agreed (as a kernel out of memory would): rank 0, waiting for
    its messages, fails at once instead of after TIMEOUT_S, and the group serves the next run."""
    group, layout = SimulatedGroup(2), Layout("zigzag", 2)
    case = Case("sliding", "none", seq_len=16)
    real_forward = ops.ring_forward

    def out_of_memory_on_rank_1(*args, **kwargs):
        if group.rank() == 1:
            raise RuntimeError("simulated: out of memory in the chunk kernel")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(simulated, "TIMEOUT_S", 3600)  # only a failed peer can end rank 0's wait
    monkeypatch.setattr(ops, "ring_forward", out_of_memory_on_rank_1)
    with pytest.raises(RuntimeError) as failure:
        group.run(_rank_step(group, case, layout))
    rank0, rank1 = failure.value.args[0].split("\nrank 1:\n")
    assert "ring exchange of the forward pass failed" in rank0 and "the exchange is abandoned" in rank0
    assert rank1.rstrip().endswith("RuntimeError: simulated: out of memory in the chunk kernel")

    monkeypatch.setattr(ops, "ring_forward", real_forward)
    results = group.run(_rank_step(group, case, layout))
    for part, want in enumerate(reference(case)):
        got = layout.unshard([r[part] for r in results], dim=2)
        assert (got.double() - want).abs().max().item() <= RING[case.dtype], part


def _waiter(barrier) -> tuple[threading.Thread, list]:
    """A thread waiting at ``barrier``; its list receives "passed" or the exception it raised."""
    outcome: list = []

    def wait():
        try:
            barrier.wait()
            outcome.append("passed")
        except Exception as e:  # noqa: BLE001 - the outcome under test
            outcome.append(e)

    thread = threading.Thread(target=wait)
    thread.start()
    return thread, outcome


def _arrived(barrier, count: int) -> None:
    while barrier._arrived != count:
        threading.Event().wait(0.001)


def test_an_abort_after_a_collective_completed_spares_its_waiters():
    """The race behind a flaky disagreement test: a peer released, not yet awake, when a rank aborts."""
    barrier = simulated._Barrier(2, threading.Event())
    thread, outcome = _waiter(barrier)
    _arrived(barrier, 1)
    with barrier._cond:  # the waiter cannot wake before the abort (the lock is reentrant)
        barrier.wait()
        barrier.abort()
    thread.join()
    assert outcome == ["passed"]
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait()  # later waits fail until reset


def test_an_abort_fails_the_waits_it_interrupts():
    barrier = simulated._Barrier(3, threading.Event())
    waiters = [_waiter(barrier) for _ in range(2)]
    _arrived(barrier, 2)
    barrier.abort()
    for thread, outcome in waiters:
        thread.join()
        assert len(outcome) == 1 and isinstance(outcome[0], threading.BrokenBarrierError)
    barrier.reset()
    waiters = [_waiter(barrier) for _ in range(2)]
    barrier.wait()
    for thread, outcome in waiters:
        thread.join()
        assert outcome == ["passed"]


def test_a_collective_whose_peer_never_comes_times_out(monkeypatch):
    monkeypatch.setattr(simulated, "TIMEOUT_S", 0.05)
    barrier = simulated._Barrier(2, threading.Event())
    thread, outcome = _waiter(barrier)
    thread.join()
    assert len(outcome) == 1 and "a collective waited 0.05 s" in str(outcome[0])
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait()


def test_flex_kernel_through_the_simulated_ring():
    """The flex kernel's ranks share one process: its calls are serialized, results exact."""
    group, layout = SimulatedGroup(2), Layout("zigzag", 2)
    for case in (Case("sliding_vision", "all"), Case("bidirectional_window", "packed_padded")):
        q, k, v, grad = make_tensors(case)
        info = make_info(case.info, case.batch, case.seq_len)

        def step(rank: int, world_size: int):
            local = [layout.shard(t, 2, rank).clone().requires_grad_(True) for t in (q, k, v)]
            out = ring_attention(*local, mask=case.mask, info=info, layout=layout, group=group, kernel="flex")
            out.backward(layout.shard(grad, 2, rank))
            return (out.detach(), *(t.grad for t in local))

        results = group.run(step)
        for part, want in enumerate(reference(case)):
            got = layout.unshard([r[part] for r in results], dim=2)
            assert (got - want).abs().max().item() <= RING[case.dtype], (case, part)
