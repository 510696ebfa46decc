"""``python -m gemma4_flexring``: the command list of ``--help``, and the usage errors."""

from __future__ import annotations

import os
import subprocess
import sys

from gemma4_flexring.__main__ import COMMANDS, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_lists_every_command_on_one_line_each():
    """``--help`` (run as users run it) exits 0 and gives each command one line with its summary."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "gemma4_flexring", "--help"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "usage: python -m gemma4_flexring {demo,train,bench,selfcheck,graph,plan} [options]"
    assert set(COMMANDS) == {"demo", "train", "bench", "selfcheck", "graph", "plan"}
    for name, (_, summary) in COMMANDS.items():
        assert [line.split() for line in lines if line.split()[:1] == [name]] == [[name, *summary.split()]]


def test_no_command_or_an_unknown_one_is_a_usage_error(capsys):
    """No command, or one that does not exist, prints the usage and returns 2 (as before --help)."""
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().out
    assert main(["nope"]) == 2
    captured = capsys.readouterr()
    assert "commands:" in captured.out and "unknown command 'nope'" in captured.err
    assert main(["-h"]) == 0
