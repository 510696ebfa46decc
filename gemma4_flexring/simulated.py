"""``gemma4_flexring.simulated``: the name users import for the simulated ring, which lives in
``testing/simulated.py``. The module *is* that one (one object, one registry of groups)."""

import sys

from .testing import simulated

sys.modules[__name__] = simulated
