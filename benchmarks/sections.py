"""benchmarks/results.md is written by several benchmarks: bench_bridge.py writes the file, and the others
(bench_scale.py, bench_trl_natural.py) each own one section of it between `<!-- begin NAME -->` and
`<!-- end NAME -->`, which bench_bridge.py keeps when it rewrites the rest."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.md"
PATTERN = re.compile(r"<!-- begin (?P<name>[\w-]+) -->\n.*?<!-- end (?P=name) -->\n", re.S)


def owned_sections(path: Path = RESULTS) -> str:
    """Every section another benchmark owns, as it stands in `path` (empty when none)."""
    return "".join(match.group(0) for match in PATTERN.finditer(path.read_text())) if path.exists() else ""


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Puts `body` into section `name` of `path`, replacing what was there, or appends it."""
    block = f"<!-- begin {name} -->\n{body.rstrip()}\n<!-- end {name} -->\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->\n.*?<!-- end {re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    path.write_text(text)
