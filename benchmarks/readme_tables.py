"""Rewrites the generated comparison blocks of the README and the documentation pages (docs/**/*.md) from the
recorded runs in baselines/.

A block opens with `<!-- differences: ARGS -->` and closes with `<!-- /differences -->`; ARGS are the arguments of
`bridgectl compare` (a recorded study and its flags). Its content is what that command prints under its results
table: what differs between the groups and the fairness facts (bridgectl/analysis/audit.py).
tests/test_compare.py::test_readme_differences_are_what_compare_prints checks every block against compare's output.

    python benchmarks/readme_tables.py [FILE.md ...]      (default: README.md and every page under docs/)
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- differences: (?P<args>.+?) -->\n(?P<body>.*?)<!-- /differences -->", re.S)


def compare_markdown(args: list[str]) -> str:
    """`bridgectl compare ARGS --format markdown`'s output, run in this process from the repository's root."""
    from typer.testing import CliRunner

    from bridgectl.cli.app import app

    result = CliRunner().invoke(app, ["compare", *args, "--format", "markdown"])
    if result.exit_code != 0:
        raise RuntimeError(f"bridgectl compare {' '.join(args)} exited {result.exit_code}: {result.output}")
    return result.output


def differences_part(markdown: str) -> str:
    """The differences title and table(s) of compare's markdown output: from each title line to the blank line
    after its table."""
    from bridgectl.analysis.tables import DIFFERENCES_TITLE

    out, inside = [], False
    for line in markdown.splitlines():
        if line.startswith(DIFFERENCES_TITLE):
            inside = True
        if inside:
            out.append(line)
            if not line and out[-2:-1] and out[-2].startswith("|"):
                inside = False
    return "\n".join(out).strip() + "\n"


def blocks(text: str) -> list[tuple[list[str], str]]:
    """(compare's arguments, the block's content) of every generated block of `text`."""
    return [(shlex.split(match["args"]), match["body"]) for match in BLOCK.finditer(text)]


def documents() -> list[Path]:
    """The files that may hold generated blocks: the README and every markdown page under docs/."""
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def all_blocks() -> list[tuple[Path, list[str], str]]:
    """(file, compare's arguments, the block's content) of every generated block in documents()."""
    return [(path, args, body) for path in documents() for args, body in blocks(path.read_text())]


def rewritten(text: str) -> str:
    def one(match: re.Match) -> str:
        body = differences_part(compare_markdown(shlex.split(match["args"])))
        return f"<!-- differences: {match['args']} -->\n{body}<!-- /differences -->"

    return BLOCK.sub(one, text)


if __name__ == "__main__":
    for path in [Path(arg) for arg in sys.argv[1:]] or documents():
        text = path.read_text()
        if not blocks(text):
            continue
        updated = rewritten(text)
        if updated != text:
            path.write_text(updated)
        print(f"{path}: {len(blocks(text))} block(s), {'rewritten' if updated != text else 'already up to date'}")
