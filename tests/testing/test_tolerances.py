"""The measure the tolerance table's relative entries bound."""

from __future__ import annotations

import torch

from gemma4_flexring.testing.tolerances import relative_error


def test_relative_error():
    want = torch.tensor([2.0, -4.0])
    assert relative_error(torch.tensor([2.0, -3.0]), want) == 0.25
    assert relative_error(torch.ones(2), torch.zeros(2)) == 1.0
