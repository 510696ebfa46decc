"""Command line: ``python -m gemma4_flexring {demo,train,bench,selfcheck,graph,plan} [options]``."""

from __future__ import annotations

import sys

# command -> (module whose ``main(argv)`` runs it, one line for ``--help``)
COMMANDS = {
    "demo": ("gemma4_flexring.tools.demo",
             "a context-parallel Gemma 4 training step on N gloo ranks, checked against one process"),
    "train": ("gemma4_flexring.tools.train",
              "train a small Gemma 4 on real text packed into long rows, dp x cp ranks; --check against one process"),
    "bench": ("gemma4_flexring.tools.bench",
              "ring attention speed, traffic and memory on gloo ranks (or one rank on a GPU)"),
    "selfcheck": ("gemma4_flexring.tools.selfcheck",
                  "check this install on the device present: parity, compile and export, kernel speed"),
    "graph": ("gemma4_flexring.tools.graph",
              "what torch.compile makes of a model over a few batches: frames, guards, graphs"),
    "plan": ("gemma4_flexring.tools.plan",
             "draw a batch's mask per rank for a layout: block classes and the rows each rank sends (PNG)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: python -m gemma4_flexring {{{','.join(COMMANDS)}}} [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "python -m gemma4_flexring COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage())
        if argv:
            print(f"python -m gemma4_flexring: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
