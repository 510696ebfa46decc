"""Aids for testing the ring, shared by ``tests/``, ``compile_tests/`` and the tools (demo, bench,
selfcheck).

- ``cases``: the scenario catalog (masks, metadata placements, ring cases, the tools' views).
- ``tolerances``: the tolerance table of every comparison.
- ``launch``: the one way ranks are started (``Cluster``, ``spawn``) and where they meet.
- ``reference``: the dense float64 reference attention.
- ``workers``: what ranks run in the ring tests; ``numerics``, ``misuse``: the same for the
  numerics and the validation tests.
- ``simulated``: the simulated ring (every rank a thread of one process).
- ``model``: a small Gemma 4 attention layer on the ring; ``compiled``: the compile tests' aids.
- ``tiny_gemma4``: tiny Gemma 4 configs and models through transformers (imports transformers).
- ``strategies``: hypothesis strategies (imports hypothesis, a test-only dependency).
"""
