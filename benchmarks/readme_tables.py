"""Rewrites the README's generated comparison blocks from the recorded runs in baselines/.

A block opens with `<!-- differences: ARGS -->` and closes with `<!-- /differences -->`; ARGS are the arguments of
`bridgectl compare` (a recorded study and its flags). Its content is what that command prints under its results
table: what differs between the groups and the fairness facts (bridgectl/compare_audit.py).
tests/test_compare.py::test_readme_differences_are_what_compare_prints checks every block against compare's output.

    python benchmarks/readme_tables.py [README.md]
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"<!-- differences: (?P<args>.+?) -->\n(?P<body>.*?)<!-- /differences -->", re.S)


def compare_markdown(args: list[str]) -> str:
    """`bridgectl compare ARGS --format markdown`'s output, run in this process from the repository's root."""
    from typer.testing import CliRunner

    from bridgectl.cli import app

    result = CliRunner().invoke(app, ["compare", *args, "--format", "markdown"])
    if result.exit_code != 0:
        raise RuntimeError(f"bridgectl compare {' '.join(args)} exited {result.exit_code}: {result.output}")
    return result.output


def differences_part(markdown: str) -> str:
    """The differences title and table(s) of compare's markdown output: from each title line to the blank line
    after its table."""
    from bridgectl.compare import DIFFERENCES_TITLE

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


def rewritten(text: str) -> str:
    def one(match: re.Match) -> str:
        body = differences_part(compare_markdown(shlex.split(match["args"])))
        return f"<!-- differences: {match['args']} -->\n{body}<!-- /differences -->"
    return BLOCK.sub(one, text)


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else README
    text = path.read_text()
    updated = rewritten(text)
    if updated != text:
        path.write_text(updated)
    print(f"{path}: {len(blocks(text))} block(s), {'rewritten' if updated != text else 'already up to date'}")
