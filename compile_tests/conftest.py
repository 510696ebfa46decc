import pytest
import torch

import gemma4_flexring


@pytest.fixture(autouse=True)
def fresh_compile_state():
    """Each test starts with no compiled code, no automatic-dynamic history and an empty mask cache."""
    torch._dynamo.reset()
    gemma4_flexring.clear_mask_cache()
    yield
    torch._dynamo.reset()
