"""``gemma4_flexring.hf``: the name users import for the transformers integration, which lives in
``integrations/transformers.py``. The module *is* that one (one object, so patches and
isinstance checks see the same names)."""

import sys

from .integrations import transformers

sys.modules[__name__] = transformers
