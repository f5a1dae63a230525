"""The README and the documentation site (docs/, mkdocs.yml) against the repository: every repository path they or a
docstring under bridgectl/ name exists, the generated pages are what docs/gen_reference.py writes now, every recipe
has its page, mkdocs.yml's nav lists every page, and the hand-written parts that restate the code (the layer
diagram, the TRL table) agree with it. `mkdocs build --strict` (make docs) checks the links and anchors between
pages; these tests need no mkdocs."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
GENERATED_DIR = DOCS / "_generated"  # included by pages, not pages (mkdocs.yml's exclude_docs)

TOP_FOLDERS = ("bridgectl", "tests", "benchmarks", "baselines", "sweeps", "docs", ".ci")
PATH = re.compile(r"(?<![\w./@-])(?:\.\./)*((?:" + "|".join(re.escape(f) for f in TOP_FOLDERS) + r")/[\w.*<>{}/-]*)")
"""A repository path: one of the top folders, then path characters (placeholders `<stage>`, `*`, `{a,b}` included);
a leading `../` (a link from a page under docs/) is dropped. Run directories (`runs/...`) and user paths
(`~/models/...`, `/shared/runs`) start elsewhere and are not repository paths."""
FILE_SUFFIXES = {
    ".py",
    ".md",
    ".yaml",
    ".yml",
    ".json",
    ".jsonl",
    ".png",
    ".txt",
    ".sh",
    ".toml",
    ".csv",
    ".log",
    ".cfg",
    ".html",
    ".safetensors",
}
WRITTEN_BY_SCRIPTS = {"benchmarks/gpu_results.md"}
"""Files a script writes where it runs (`make gpu-check`), named in the docs as its output, not kept in the
repository."""
INCLUDED = {
    DOCS / "guides" / "sweeps.md": ROOT / "sweeps" / "README.md",
    DOCS / "benchmarks" / "results.md": ROOT / "benchmarks" / "results.md",
    DOCS / "benchmarks" / "first-steps.md": ROOT / "benchmarks" / "first_steps.md",
    DOCS / "results" / "recorded-runs.md": ROOT / "baselines" / "README.md",
}
"""Docs pages that include a repository file (pymdownx.snippets): the file is part of the site, so its paths are
checked too."""


def doc_pages() -> list[Path]:
    """Every page of the site: the markdown files under docs/ but docs/_generated/."""
    return sorted(path for path in DOCS.rglob("*.md") if GENERATED_DIR not in path.parents)


def documents() -> list[Path]:
    """Every markdown file the README or the site shows: the README, the pages, what they include."""
    return [README, *doc_pages(), *sorted(GENERATED_DIR.rglob("*.md")), *INCLUDED.values()]


def docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every docstring of a module: the module's, each class's and function's, and each attribute
    docstring (a string statement after an assignment, as the config fields have)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for statement in body:
                if (
                    isinstance(statement, ast.Expr)
                    and isinstance(statement.value, ast.Constant)
                    and isinstance(statement.value.value, str)
                ):
                    found.append((statement.lineno, statement.value.value))
    return found


def unescaped(text: str) -> str:
    """Markdown text with its backslash escapes undone (the generated pages escape `_` in plain text)."""
    return re.sub(r"\\([\\`*_{}\[\]()#+\-.!|<>])", r"\1", text)


def path_exists(path: str) -> bool:
    """Whether the repository has `path`: a file or folder, a glob for placeholders, a module for `pkg/mod.attr`."""
    path = path.rstrip(".")
    if path in WRITTEN_BY_SCRIPTS:
        return True
    if re.search(r"[<*{]", path):
        pattern = re.sub(r"<[^>/]*>|\{[^}/]*\}", "*", path)
        return any(ROOT.glob(pattern.rstrip("/")))
    if (ROOT / path).exists():
        return True
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if "." in last and Path(last).suffix not in FILE_SUFFIXES:  # `bridgectl/training/setup.build_context`
        module = path.rsplit("/", 1)[0] + "/" + last.split(".")[0]
        return (ROOT / f"{module}.py").exists() or (ROOT / module).is_dir()
    return False


def named_paths(text: str) -> list[str]:
    return [match.group(1) for match in PATH.finditer(unescaped(text))]


def missing_paths(document: Path) -> list[str]:
    """The paths `document` names that exist neither in the repository nor, for a link between pages of the site
    (`../benchmarks/index.md` from docs/results/), beside the document."""
    missing = []
    for match in PATH.finditer(unescaped(document.read_text())):
        named, as_written = match.group(1), match.group(0)
        if not path_exists(named) and not (document.parent / as_written.rstrip(".")).exists():
            missing.append(f"{document.relative_to(ROOT)}: {named}")
    return missing


# ---- (a) every repository path the docs, the README and the docstrings name exists ------------------------------
def test_the_path_pattern_finds_repository_paths_and_nothing_else():
    text = (
        "see `bridgectl/stages/bridge.py`, benchmarks/bench_decode.py and [plot](../baselines/x/report/a.png); "
        "`sweeps/quick.yaml` (tests/test_resume.py::test_a). Not: runs/sweeps/paper, ~/models/smollm2, "
        "/shared/runs, pip install 'bridgectl[vllm]', https://example.org/bridgectl/x.py"
    )
    assert named_paths(text) == [
        "bridgectl/stages/bridge.py",
        "benchmarks/bench_decode.py",
        "baselines/x/report/a.png",
        "sweeps/quick.yaml",
        "tests/test_resume.py",
    ]
    assert path_exists("bridgectl/stages/<stage>_config.py") and path_exists("bridgectl/conf/recipe/*.yaml")
    assert path_exists("baselines/paper-5seeds/") and path_exists("bridgectl/stages/__init__.py.")
    assert path_exists("bridgectl/stages/__init__.build_stage")
    assert not path_exists("bridgectl/stages/nonexistent.py") and not path_exists("bridgectl/nope.build")
    assert not path_exists("bridgectl/stages/<nothing>_like_this.py")


def test_every_repository_path_in_the_readme_and_the_docs_exists():
    missing = [line for path in documents() for line in missing_paths(path)]
    assert missing == [], "paths named in the docs that do not exist:\n" + "\n".join(missing)


def test_every_repository_path_in_a_docstring_under_bridgectl_exists():
    missing = []
    for module in sorted((ROOT / "bridgectl").rglob("*.py")):
        for line, text in docstrings(module):
            missing += [
                f"{module.relative_to(ROOT)}:{line}: {named}" for named in named_paths(text) if not path_exists(named)
            ]
    assert missing == [], "paths named in docstrings that do not exist:\n" + "\n".join(missing)


def test_every_module_the_docs_name_by_its_dotted_name_exists():
    """`python -m bridgectl.config.defaults_table` and the like: the longest importable prefix is a module of
    bridgectl, and what follows it, if anything, is one of its attributes."""
    wrong = []
    for path in [README, *doc_pages()]:
        for dotted in sorted(set(re.findall(r"(?<![\w/.])bridgectl(?:\.[a-z_]\w*)+", path.read_text()))):
            parts = dotted.split(".")
            cut = next(
                (n for n in range(len(parts), 0, -1) if importlib.util.find_spec(".".join(parts[:n])) is not None), 0
            )
            rest = parts[cut:]
            if (
                cut < 2
                and rest
                or len(rest) > 1
                or (rest and not hasattr(importlib.import_module(".".join(parts[:cut])), rest[0]))
            ):
                wrong.append(f"{path.relative_to(ROOT)}: {dotted}")
    assert wrong == [], wrong


# ---- (b) the generated pages are what the generator writes now -------------------------------------------------
def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_equal_the_generators_output():
    """A changed field docstring, default, command option or stage docstring fails here until
    `python docs/gen_reference.py` (make docs) rewrites the pages."""
    pages = _generator().pages()
    assert {DOCS / "reference" / "config.md", DOCS / "reference" / "cli.md"} <= set(pages)
    stale = [
        str(path.relative_to(ROOT)) for path, text in pages.items() if not path.exists() or path.read_text() != text
    ]
    assert stale == [], f"run python docs/gen_reference.py: {stale} differ from what it writes"
    leftover = sorted(str(p.relative_to(ROOT)) for p in GENERATED_DIR.rglob("*.md") if p not in pages)
    assert leftover == [], f"not written by docs/gen_reference.py any more: {leftover}"


def test_the_config_reference_names_every_key_of_the_schema_with_its_docstring():
    schema = importlib.import_module("bridgectl.config.schema")
    page = (DOCS / "reference" / "config.md").read_text()
    rows = {match.group(1): match.group(2) for match in re.finditer(r"^\| `([\w.]+)` \|(.*)\|$", page, re.M)}
    assert set(rows) == set(schema.schema_types())
    assert "Start from these weights instead of the model's own" in rows["model.init_from"]
    assert "| `1e-05` |" not in page and "`rl.lr` | float | `1e-4` | `1e-5` |" in page


def test_the_cli_reference_has_every_command_and_option():
    import typer

    app = importlib.import_module("bridgectl.cli.app").app
    page = (DOCS / "reference" / "cli.md").read_text()
    for name, command in typer.main.get_command(app).commands.items():
        assert f"## `bridgectl {name}`" in page, name
        for param in command.params:
            for option in getattr(param, "opts", []):
                if option.startswith("--") and option != "--help":
                    assert f"`{option}" in page, (name, option)


# ---- (c) every recipe has a page, which states its update rule and keys as the code does -----------------------
def recipes() -> list[str]:
    return sorted(path.stem for path in (ROOT / "bridgectl" / "conf" / "recipe").glob("*.yaml"))


def test_every_recipe_has_a_page_or_a_section_of_one():
    """A recipe has docs/methods/<recipe>.md, or (BRIDGE's ablations) a heading naming it on another method page;
    the methods index, mkdocs.yml and the README's recipe table link to it."""
    headings = {
        path: [line for line in path.read_text().splitlines() if line.startswith("#")]
        for path in (DOCS / "methods").glob("*.md")
    }
    index, readme = (DOCS / "methods" / "index.md").read_text(), README.read_text()
    assert len(recipes()) >= 14
    for recipe in recipes():
        page = DOCS / "methods" / f"{recipe}.md"
        if page.exists():
            assert page.read_text().startswith(f"# `{recipe}`: "), recipe
        else:
            sections = [(path, line) for path, lines in headings.items() for line in lines if f"`{recipe}`" in line]
            assert sections, f"recipe {recipe} has no page (docs/methods/{recipe}.md) and no section of one"
        assert f"[`{recipe}`](" in index and f"[`{recipe}`](docs/methods/" in readme, recipe


def test_each_stage_page_includes_its_update_rule_and_its_keys_from_the_code():
    from bridgectl.stages import STAGES

    for kind, info in STAGES.items():
        text = (DOCS / "methods" / f"{kind}.md").read_text()
        assert f'--8<-- "docs/_generated/stages/{kind}.md"' in text, kind
        section = kind if info.config is not None else {"sft": "sft", "rl": "rl"}[kind]
        assert f'--8<-- "docs/_generated/keys/{section}.md"' in text, kind
        assert f"`bridgectl/stages/{info.module}.py`" in text
        assert re.search(r"## What checks it\n\n- `tests/test_\w+\.py`", text), kind


# ---- (d) the nav lists every page --------------------------------------------------------------------------------
def nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [page for value in node.values() for page in nav_pages(value)]
    return [page for item in node for page in nav_pages(item)]


def test_the_nav_lists_every_page_once():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = nav_pages(config["nav"])
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(path.relative_to(DOCS).as_posix() for path in doc_pages())
    assert "/_generated/" in config["exclude_docs"]


# ---- what the docs restate from the code ---------------------------------------------------------------------------
def test_the_layer_diagram_is_the_one_tests_test_layers_enforces():
    tree = ast.parse((ROOT / "tests" / "test_layers.py").read_text())
    layers = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(target, "id", "") == "LAYERS" for target in node.targets)
    )
    text = (DOCS / "contributing.md").read_text()
    block = text.split("## Architecture", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    drawn = []
    for line in block.splitlines():
        if "│" in line:
            continue  # a note under a layer
        names = re.split(r"\s{2,}", line.replace("└─", "").strip())[0]
        drawn.append(tuple(name.strip() for name in names.split("|")))
    assert drawn == [tuple(layer) for layer in layers]


def test_the_trl_table_is_the_one_trl_names_renders():
    from bridgectl.config.trl_names import markdown_table

    assert markdown_table() in (DOCS / "guides" / "coming-from-trl.md").read_text()


def test_the_readme_opens_with_the_two_commands_and_stays_short():
    lines = README.read_text().splitlines()
    assert lines[:6] == [
        "# bridgectl",
        "",
        "```bash",
        "make demo    # sets up .venv (torch 2.13 CPU first, then this package) and runs the main job: `bridgectl run`",
        "make test    # sets up .venv the same way and runs the test suite (11-18 minutes on 2 idle CPU cores)",
        "```",
    ]
    assert len(lines) <= 250


@pytest.mark.parametrize("page", [README, *(DOCS / "results").glob("*.md")], ids=lambda p: p.name)
def test_every_difference_in_a_results_table_carries_its_interval(page):
    """In the comparison tables (rows of compare's markdown), every Δ cell is a difference with its interval, or
    the baseline: a number without its interval would break the house rule."""
    for line in page.read_text().splitlines():
        if not line.startswith("| ") or " | " not in line:
            continue
        for cell in line.strip("|").split(" | "):
            cell = cell.strip()
            if re.fullmatch(r"[+-]\d+(\.\d+)?( .*)?", cell):  # a signed difference
                assert re.match(r"[+-]\d+(\.\d+)? \[[+-]\d", cell), (page.name, cell)
