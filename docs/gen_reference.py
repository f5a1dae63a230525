"""Writes the documentation's reference pages from the code, so that they cannot drift from it:

    docs/reference/config.md   every config key: its type, its default, its `model=hf` value where that differs,
                               and its docstring (the schema's dataclass field docstrings, bridgectl/config/schema.py
                               and each stage's bridgectl/stages/<stage>_config.py)
    docs/reference/cli.md      every `bridgectl` command with its arguments and options (the typer app,
                               bridgectl/cli/app.py, read through its click commands)
    docs/_generated/stages/    each stage's module docstring (its update rule and the paper's equations) as
                               markdown, and docs/_generated/keys/ the key tables of the stages' sections: the
                               method pages (docs/methods/) include them
    docs/_generated/layout.md  every module under bridgectl/ with its docstring's first sentence (contributing.md
                               includes it)

    python docs/gen_reference.py           rewrite both pages (`make docs` runs it before `mkdocs build`)
    python docs/gen_reference.py --check   exit 1, naming the page, when a committed page differs

tests/test_docs.py asserts that the committed pages equal `pages()`, so a changed docstring, default or option fails
the tests until this script is rerun.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference"
GENERATED = ROOT / "docs" / "_generated"
STAGE_RULES = GENERATED / "stages"  # included by the method pages, not pages themselves
KEY_TABLES = GENERATED / "keys"
HF_OVERRIDES = ["model=hf", "model.name_or_path=MODEL"]  # a model=hf run that sets nothing but the model
REQUIRED_WITH_HF = {"model.name_or_path"}


def _module(new: str, old: str):
    """The module at its new path (bridgectl's packages), or at its old one while a checkout still has that."""
    try:
        return importlib.import_module(new)
    except ModuleNotFoundError as error:
        if error.name is None or not new.startswith(error.name):
            raise
        return importlib.import_module(old)


# ---- markdown helpers --------------------------------------------------------------------------------------------
_ESCAPED = {"\\": "\\\\", "|": "\\|", "*": "\\*", "_": "\\_", "[": "\\[", "]": "\\]", "<": "&lt;", ">": "&gt;"}


def prose(text: str) -> str:
    """`text` on one line, with the characters markdown would read as markup escaped outside its code spans (a
    docstring is plain text with `code` spans; in a table cell a bare | would end the cell)."""
    text = " ".join(text.split())
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(part)  # Python-Markdown's tables take a | inside a code span as text
        else:
            out.append("".join(_ESCAPED.get(char, char) for char in part))
    return "".join(out)


def code(value: str) -> str:
    """`value` as one inline code span (safe in a table cell: Python-Markdown reads a | inside it as text)."""
    fence = "``" if "`" in value else "`"
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


# ---- the config reference ----------------------------------------------------------------------------------------
@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} of dataclass `cls`: the string statement after each annotated field, read from
    the class's source (tests/test_config.py requires one for every field)."""
    source = Path(inspect.getsourcefile(cls)).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            docs = {}
            for index, statement in enumerate(node.body):
                following = node.body[index + 1] if index + 1 < len(node.body) else None
                if (
                    isinstance(statement, ast.AnnAssign)
                    and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)
                ):
                    docs[statement.target.id] = inspect.cleandoc(following.value.value)
            return docs
    raise LookupError(f"class {cls.__name__} not found in {inspect.getsourcefile(cls)}")


def type_name(hint: Any) -> str:
    """A field's annotated type as the YAML user reads it: `float`, `list[int]`, `str or null`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        named = [type_name(arg) for arg in args if arg is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return " \\| ".join(repr(arg) for arg in args)
    if origin in (list, tuple, dict) or origin is not None:
        name = {list: "list", tuple: "tuple", dict: "dict"}.get(origin, getattr(origin, "__name__", str(origin)))
        return f"{name}[{', '.join(type_name(arg) for arg in args)}]" if args else name
    if hint is Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def _number(value: float) -> str:
    """A float as one writes it in an override: `1e-5`, not Python's `1e-05`."""
    if value != 0 and not 1e-3 <= abs(value) < 1e4:
        mantissa, exponent = f"{value:.12e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return repr(value)


def yaml_value(value: Any) -> str:
    """A config value in override syntax: `true`, `null`, `[2, 4]`, `{}`, `1e-4`."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {yaml_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, str):
        return '""' if value == "" else value.encode("unicode_escape").decode("ascii").replace("\\\\", "\\")
    return str(value)


def _value(cfg, key: str) -> str:
    from omegaconf import OmegaConf

    parent, _, leaf = key.rpartition(".")
    if OmegaConf.is_missing(OmegaConf.select(cfg, parent) if parent else cfg, leaf):
        return "required"
    node = OmegaConf.select(cfg, key)
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node)
    return yaml_value(node)


def _leaves(cls: type, prefix: str, docs: dict[str, str] | None = None):
    """(dotted key, annotated type, docstring, owning dataclass) of every leaf under `cls`; a dataclass-typed field
    is a section, yielded as (key, None, docstring, cls) before its leaves. `docs`: the field docstrings of `cls`
    when its source has no class of that name (the schema's Config is made by dataclasses.make_dataclass)."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls) if docs is None else docs
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            yield f"{prefix}{item.name}", None, docs.get(item.name, ""), cls
            yield from _leaves(hint, f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", hint, docs.get(item.name, ""), cls


@functools.cache
def config_sections() -> dict[str, tuple[str, str]]:
    """{section: (its description, the markdown of its keys: tables, and a line per nested section)} in schema
    order; a top-level key that is not a section (`seed`) is a section of one key."""
    schema = _module("bridgectl.config.schema", "bridgectl.schema")
    compose = _module("bridgectl.config.compose", "bridgectl.config").compose
    from bridgectl.stages import STAGES

    defaults = schema.schema_defaults()
    tiny, hf = compose([]), compose(HF_OVERRIDES)
    shared_docs = _field_docs(schema.SharedConfig)
    hints = typing.get_type_hints(schema.Config)

    entries: dict[str, list[tuple[str, Any, str]]] = {}
    for key, hint, doc, _ in _leaves(schema.Config, "", shared_docs):
        entries.setdefault(key.split(".")[0], []).append((key, hint, doc))
    sections = {}
    for section, rows in entries.items():
        stage = STAGES.get(section)
        own = stage is not None and stage.config is hints[section]
        if own:
            module = hints[section].__module__.replace(".", "/") + ".py"
            about = (
                f"{prose(stage.config_summary)} The `{section}` stage's own section (`{module}`; "
                f"[method page](../methods/{section}.md))."
            )
        elif dataclasses.is_dataclass(hints[section]):
            about = prose(shared_docs.get(section, ""))
        else:
            about = ""
        lines: list[str] = []
        table_open = False
        for key, hint, doc in rows:
            if hint is None:  # a nested section: its docstring, then its keys in a table of their own
                if key == section:
                    continue
                if table_open:
                    lines.append("")
                    table_open = False
                lines += [f"`{key}.*`: {prose(doc)}", ""]
                continue
            if not table_open:
                lines += ["| key | type | default | `model=hf` | description |", "|---|---|---|---|---|"]
                table_open = True
            default = _value(defaults, key)
            hf_value = _value(hf, key)
            if key in REQUIRED_WITH_HF:
                with_hf = "required"
            elif hf_value != _value(tiny, key):
                with_hf = code(hf_value)
            else:
                with_hf = ""
            lines.append(
                f"| {code(key)} | {type_name(hint).replace('|', chr(92) + '|')} | "
                f"{default if default == 'required' else code(default)} | {with_hf} | {prose(doc)} |"
            )
        sections[section] = (about, "\n".join(lines).rstrip() + "\n")
    return sections


def config_page() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- generated by python docs/gen_reference.py from the config schema; tests/test_docs.py checks it -->",
        "Every key of a run's config, section by section, as `bridgectl run KEY=VALUE` takes it: its type, its "
        "default, the value `model=hf` gives it where that differs, and the field's docstring. The schema is "
        "`bridgectl/config/schema.py` (the shared sections) and each stage's `bridgectl/stages/<stage>_config.py` (its "
        "own section); this page is generated from them by `docs/gen_reference.py`. **default** is the schema's, "
        "which is what a run on the built-in tiny model gets, except that every recipe file "
        "(`bridgectl/conf/recipe/*.yaml`) sets `recipe.*` and its own `train.max_steps`, and an experiment "
        "(`experiment=NAME`) sets whatever its file says. **`model=hf`** is the value `bridgectl/conf/model/hf.yaml` "
        "gives a real model instead. `bridgectl run --dry-run [OVERRIDES]` prints every key with the value a run "
        "would get.",
        "",
        "A value of the wrong type or out of range, and an unknown key, exits 2 with `Error:` and a `Hint:` (TRL's "
        "names get bridgectl's: [Coming from TRL](../guides/coming-from-trl.md)).",
        "",
    ]
    for section, (about, table) in config_sections().items():
        lines += [f"## `{section}`", ""] + ([about, ""] if about else []) + [table]
    return "\n".join(lines).rstrip() + "\n"


def key_pages() -> dict[Path, str]:
    """{docs/_generated/keys/<section>.md: that section's key table} for the sections a method page shows (each
    stage's own section, and the shared sft and rl sections)."""
    from bridgectl.stages import STAGES

    shown = [section for section in config_sections() if section in STAGES or section == "recipe"]
    header = "<!-- generated by python docs/gen_reference.py from the config schema -->\n"
    return {KEY_TABLES / f"{section}.md": header + config_sections()[section][1] for section in shown}


# ---- the command-line reference ----------------------------------------------------------------------------------
def _app():
    module = _module("bridgectl.cli.app", "bridgectl.cli")
    return module.app


def cli_page() -> str:
    import typer

    group = typer.main.get_command(_app())
    context_class = type(group).context_class
    root = context_class(group, info_name="bridgectl")
    lines = [
        "# Command-line reference",
        "",
        "<!-- generated by python docs/gen_reference.py from the typer app; tests/test_docs.py checks it -->",
        f"{prose(group.help or '')} Every command below is `bridgectl COMMAND` (or `python -m bridgectl COMMAND`); "
        "`bridgectl COMMAND --help` prints the same. Generated from `bridgectl/cli/app.py` by "
        "`docs/gen_reference.py`. Bad input to any command exits 2 with an `Error:` line and a `Hint:`, and writes "
        "nothing.",
        "",
    ]
    for name, command in group.commands.items():
        if command.hidden:
            continue
        ctx = context_class(command, info_name=name, parent=root)
        usage = " ".join(["bridgectl", name, *command.collect_usage_pieces(ctx)])
        paragraphs = [prose(part) for part in re.split(r"\n\s*\n", inspect.cleandoc(command.help or ""))]
        lines += [f"## `bridgectl {name}`", "", *[p + "\n" for p in paragraphs if p], "```text", usage, "```", ""]
        rows = []
        for param in command.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None or param.name == "help":
                continue
            names, help_text = record
            kind = "argument" if type(param).__name__.endswith("Argument") else "option"
            rows.append(f"| {code(names)} | {kind} | {prose(help_text)} |")
        if rows:
            lines += ["| argument or option | kind | what |", "|---|---|---|", *rows, ""]
    return "\n".join(lines).rstrip() + "\n"


# ---- each stage's update rule, from its module docstring -------------------------------------------------------
def docstring_markdown(doc: str) -> str:
    """A stage docstring (plain text: paragraphs, formula blocks indented by 4 spaces, `  - ` bullets whose
    continuation lines are indented deeper, `  label` lines over a list) as markdown: formula blocks become fenced
    text blocks, kept character for character; everything else is escaped prose."""
    segments: list[tuple[str, Any]] = []  # ("p", lines) | ("li", lines) | ("label", text) | ("code", lines)
    for block in re.split(r"\n\s*\n", doc.strip("\n")):
        lines = block.split("\n")
        if all(len(line) - len(line.lstrip()) >= 4 for line in lines):
            segments.append(("code", [line[4:] for line in lines]))
            continue
        current: tuple[str, Any] | None = None
        item_indent = -1
        for line in lines:
            indent, stripped = len(line) - len(line.lstrip()), line.strip()
            if stripped.startswith("- "):
                current, item_indent = ("li", [stripped[2:]]), indent
                segments.append(current)
            elif current is not None and current[0] == "li" and indent > item_indent:
                current[1].append(stripped)  # the open item's continuation
            elif indent >= 4 and current is not None and current[0] in ("p", "code"):
                if current[0] != "code":
                    current = ("code", [])
                    segments.append(current)
                current[1].append(line[4:])
            elif 0 < indent < 4:
                current = None
                segments.append(("label", stripped))
            else:
                if current is None or current[0] != "p":
                    current = ("p", [])
                    segments.append(current)
                current[1].append(stripped)
        segments.append(("end", None))
    out: list[str] = []
    previous = "end"
    for kind, value in segments:
        if kind == "end":
            out.append("")
        elif kind == "code":
            out += ["", "```text", *value, "```", ""]
        elif kind == "label":
            out += ["", f"*{prose(value)}*", ""]
        elif kind == "li":
            if previous not in ("li", "label"):
                out.append("")
            out.append("- " + prose(" ".join(value)))
        else:
            if previous == "li":
                out.append("")
            out.append(prose(" ".join(value)))
        previous = kind
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def stage_pages() -> dict[Path, str]:
    """{docs/_generated/stages/<stage>.md: the stage module's docstring as markdown} for every registered stage;
    each method page includes its stage's (pymdownx.snippets), so the equations there are the code's."""
    from bridgectl.stages import STAGES

    pages = {}
    for kind, info in STAGES.items():
        source = ROOT / "bridgectl" / "stages" / f"{info.module}.py"
        doc = ast.get_docstring(ast.parse(source.read_text()), clean=True) or ""
        header = (
            f"<!-- generated by python docs/gen_reference.py from the docstring of "
            f"bridgectl/stages/{info.module}.py -->\n"
        )
        pages[STAGE_RULES / f"{kind}.md"] = header + docstring_markdown(doc)
    return pages


# ---- the package layout, from the modules' docstrings -------------------------------------------------------------
def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph (all of that paragraph when it has one sentence)."""
    paragraph = " ".join(re.split(r"\n\s*\n", doc.strip())[0].split())
    match = re.search(r"(?<=[a-z0-9)`'\"])\.\s+(?=[A-Z`(])", paragraph)
    return paragraph[: match.start() + 1] if match else paragraph


def layout_page() -> str:
    """A table of every module under bridgectl/ by package, each with its docstring's first sentence."""
    package_root = ROOT / "bridgectl"
    lines = [
        "<!-- generated by python docs/gen_reference.py from the modules' docstrings -->",
        "| module | what it is (the first sentence of its docstring) |",
        "|---|---|",
    ]
    files = sorted(path for path in package_root.rglob("*.py") if "__pycache__" not in path.parts)

    def order(path: Path) -> tuple:
        return path.parent.relative_to(package_root).parts, path.name != "__init__.py", path.name

    for path in sorted(files, key=order):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if not doc and path.name == "__init__.py":
            continue
        relative = path.relative_to(ROOT).as_posix()
        shown = relative.removesuffix("__init__.py") if path.name == "__init__.py" else relative
        lines.append(f"| {code(shown)} | {prose(first_sentence(doc))} |")
    return "\n".join(lines) + "\n"


def pages() -> dict[Path, str]:
    """{path: content} of every generated page."""
    return {
        REFERENCE / "config.md": config_page(),
        REFERENCE / "cli.md": cli_page(),
        **stage_pages(),
        **key_pages(),
        GENERATED / "layout.md": layout_page(),
    }


def main(argv: list[str]) -> int:
    stale = []
    for path, text in pages().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if "--check" in argv:
            stale.append(path.relative_to(ROOT))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("stale (run python docs/gen_reference.py): " + ", ".join(map(str, stale)))
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
