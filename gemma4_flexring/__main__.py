"""Command line: ``python -m gemma4_flexring {demo,graph,bench,selfcheck} [options]``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"demo": "gemma4_flexring.tools.demo", "graph": "gemma4_flexring.tools.graph", "bench": "gemma4_flexring.tools.bench",
                "selfcheck": "gemma4_flexring.tools.selfcheck"}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m gemma4_flexring {{{','.join(commands)}}} [options]  (--help after a command)")
        return 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
