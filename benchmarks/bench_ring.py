"""Ring attention benchmark: a thin wrapper around ``python -m gemma4_flexring bench``.

    python benchmarks/bench_ring.py [--world-size 2] [--seq-len 8192] [--mask causal] ...

Takes the same options (``--help``); see ``gemma4_flexring/bench.py``.
"""

from __future__ import annotations

import sys

from gemma4_flexring.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
