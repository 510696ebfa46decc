"""The README and docs/ as written: every ```python block runs, every command line parses.

Each ```python block of README.md and docs/*.md runs as a script of its own in a fresh
interpreter (this checkout's package first on the path, a temporary working directory), and must
exit 0: a block checks its results with asserts, and a block that needs several ranks spawns
them itself or runs them as threads (``SimulatedGroup``). Every fenced block names its language,
so none escapes by being untagged; ```bash blocks are not run, but each ``python -m
gemma4_flexring`` (and ``benchmarks/*.py``) command in them must be accepted by that command's
argument parser. ```text blocks are output and formulas.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "text"}
BLOCK_TIMEOUT_S = 300
WORKERS = 2  # scripts run at once (several spawn gloo ranks of their own)


def blocks(path: Path) -> list[tuple[int, str, str]]:
    """(first line number, language, code) of every fenced block in ``path``."""
    return blocks_in(path.read_text(), path.name)


def blocks_in(text: str, name: str = "text") -> list[tuple[int, str, str]]:
    found, lines = [], text.splitlines()
    start = language = None
    for number, line in enumerate(lines, 1):
        if start is None and line.startswith("```"):
            start, language = number, line[3:].strip()
        elif start is not None and line.rstrip() == "```":
            found.append((start + 1, language, "\n".join(lines[start:number - 1]) + "\n"))
            start = None
    assert start is None, f"{name}:{start}: a fenced block is not closed"
    return found


def scripts() -> list[tuple[str, str]]:
    """(file:line, code) of every python block."""
    return [(f"{path.name}:{line}", code) for path in DOCS for line, language, code in blocks(path)
            if language == "python"]


def commands() -> list[tuple[str, list[str]]]:
    """(file:line, argv) of each ``python -m gemma4_flexring`` / ``benchmarks/*.py`` command in bash blocks."""
    out = []
    for path in DOCS:
        for first, language, code in blocks(path):
            if language != "bash":
                continue
            start, text = first, ""
            for number, line in enumerate(code.splitlines(), first):
                text, start = text + line.rstrip("\\"), start if text else number
                if line.endswith("\\"):
                    continue
                words = shlex.split(text, comments=True)
                if "gemma4_flexring" in words and words[words.index("gemma4_flexring") - 1] == "-m":
                    out.append((f"{path.name}:{start}", words[words.index("gemma4_flexring") + 1:]))
                elif any(w.startswith("benchmarks/") for w in words):
                    script = next(i for i, w in enumerate(words) if w.startswith("benchmarks/"))
                    out.append((f"{path.name}:{start}", words[script:]))
                text = ""
    return out


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of ``path``'s headings: lower case, punctuation dropped, spaces to hyphens."""
    prose = re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    headings = re.findall(r"^#+ (.+)$", prose, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_block_names_its_language():
    untagged = [f"{p.name}:{line} ({lang!r})" for p in DOCS for line, lang, _ in blocks(p) if lang not in LANGUAGES]
    assert not untagged, f"fenced blocks must be one of {sorted(LANGUAGES)}: {untagged}"


def run_script(code: str, directory: Path) -> subprocess.CompletedProcess:
    script = directory / "block.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script)], cwd=directory, env=env, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)


@pytest.fixture(scope="module")
def started(request, tmp_path_factory):
    """The selected blocks' scripts, started ``WORKERS`` at a time when the first one is needed."""
    selected = {item.callspec.id for item in request.session.items
                if getattr(item, "originalname", None) == "test_python_block_runs"}
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        yield {name: pool.submit(run_script, code, tmp_path_factory.mktemp("block"))
               for name, code in scripts() if name in selected}


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name, _ in scripts()])
def test_python_block_runs(name, started):
    done = started[name].result()
    assert done.returncode == 0, f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"


SPAWNED_RANK_RAISES = """
import torch.multiprocessing as mp

def rank_main(rank):
    if rank == 1:
        raise RuntimeError("rank 1 fails")

if __name__ == "__main__":
    mp.spawn(rank_main, nprocs=2)
"""


@pytest.mark.parametrize("code", ["raise RuntimeError('the block fails')\n", SPAWNED_RANK_RAISES],
                         ids=["block_raises", "spawned_rank_raises"])
def test_a_block_that_raises_fails(code, tmp_path):
    """The harness is not blind: a block that raises, in its own process or in a rank it spawned, fails."""
    assert run_script(code, tmp_path).returncode != 0


class _Parsed(Exception):
    """Raised once a command's options parsed: the command itself is not run."""


@pytest.mark.parametrize("argv", [pytest.param(argv, id=name) for name, argv in commands()])
def test_command_line_parses(argv):
    """Each documented command line is accepted by its command's parser (parsed, not run)."""
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop), pytest.raises(_Parsed):
        if argv[0].startswith("benchmarks/"):
            with mock.patch.object(sys, "argv", argv):
                runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
        else:
            from gemma4_flexring.__main__ import main

            main(argv)


def test_quickstart_is_the_two_commands():
    """The README's Quickstart holds exactly the two commands, in one block."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    code = [c for _, _, c in blocks_in(section)]
    assert code[0] == 'pip install -e ".[test]" && python -m gemma4_flexring demo\npython -m pytest\n'


def test_links_resolve_and_readme_indexes_every_doc():
    """Relative links in README and docs/ point at files (and headings) that exist; the README
    links every doc."""
    broken = []
    for path in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", path.read_text()):
            if "://" in target:
                continue
            linked = path.parent / target if target else path
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{path.name} -> {target}#{anchor}")
    assert not broken, broken
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in DOCS[1:] if f"(docs/{p.name})" not in readme]
    assert not missing, f"README's index of docs/ lacks {missing}"


def test_module_map_lists_every_module():
    """docs/design.md's module map names every module of the package, and only those."""
    text = (ROOT / "docs" / "design.md").read_text()
    table = text.split("<!-- module map -->", 2)[1]
    named = set(re.findall(r"^\| `([\w/]+\.py)` \|", table, flags=re.MULTILINE))
    package = ROOT / "gemma4_flexring"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py")
               if p.name != "__init__.py" or p.parent == package or p.read_text().strip()}
    assert named == modules, f"missing from the map: {sorted(modules - named)}; not in the tree: {sorted(named - modules)}"
