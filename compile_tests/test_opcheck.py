"""torch.library.opcheck of every op the package registers: the ring ops in float32 and float64,
with no metadata, each metadata tensor alone and all of them, and with a FlexMask, in one process
and on two gloo ranks; the generation op's schema and fake kernel."""

from __future__ import annotations

import torch

import gemma4_flexring  # noqa: F401  (registers the ops)
from gemma4_flexring.testing.compiled import METADATA_VARIANTS, OPCHECK_TESTS, opcheck_all

OPS = ["gemma4_flexring::new_generation", "gemma4_flexring::ring_attention",
       "gemma4_flexring::ring_attention_backward"]
RING_OPS = 2


def _check(results: list[tuple[str, dict]]) -> None:
    assert len(results) == RING_OPS * 2 * (len(METADATA_VARIANTS) + 1)  # ops x dtypes x (variants + FlexMask)
    failed = {name: r for name, r in results if r != dict.fromkeys(OPCHECK_TESTS, "SUCCESS")}
    assert not failed


def test_every_registered_op_is_covered():
    registered = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("gemma4_flexring::"))
    assert registered == OPS


def test_opcheck_new_generation():
    """Its value differs on every call by design, so the checks that compare two runs' values
    (autograd registration, AOT dispatch) do not apply; schema and fake kernel do."""
    tests = ("test_schema", "test_faketensor")
    result = torch.library.opcheck(torch.ops.gemma4_flexring.new_generation.default, (torch.zeros(3),),
                                   test_utils=tests)
    assert result == dict.fromkeys(tests, "SUCCESS")


def test_opcheck_one_rank():
    _check(opcheck_all(0, 1))


def test_opcheck_two_ranks(cluster):
    for results in cluster(2).run(opcheck_all):
        _check(results)
