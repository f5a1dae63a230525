"""The house's layers, checked from the source: each package imports only the layers below it (the core nothing
above it), no module imports itself back through others, each stage owns its config section (beside its update
rule, torch-free), and the shared config holds no stage's section."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import bridgectl
from bridgectl.stages import STAGES

PACKAGE = Path(bridgectl.__file__).resolve().parent
LAYERS = [
    ("cli",),
    ("sweep",),
    ("training", "analysis", "launch"),
    ("rundir",),
    ("models",),
    ("tasks",),
    ("config",),
    ("stages",),
    ("core",),
    ("errors",),
]
"""bridgectl's packages from the top down: a module may import its own package and any layer below its own, never a
package beside it (training, analysis and launch do not import each other) or above it."""
LEVEL = {package: depth for depth, packages in enumerate(LAYERS) for package in packages}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, function-level ones included, relative ones resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            # `from package import name`: the name may be a module of the package (import_graph keeps those)
            found += [(node.lineno, module)] + [
                (node.lineno, f"{module}.{alias.name}") for alias in node.names if module.startswith("bridgectl")
            ]
    return found


def module_name(path: Path) -> str:
    """`bridgectl.training.runner` for bridgectl/training/runner.py; a package's __init__.py is the package."""
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """{module: {bridgectl module it imports: line}} for every module under `root` (function-level imports too: a
    lazy import is still a dependency), `from package import name` resolved to the module `name` when it is one."""
    modules = {module_name(path): path for path in root.rglob("*.py")}
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for line, module in imported_modules(path):
            target = module if module in modules else module.rpartition(".")[0]
            if target in modules and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def package_of(module: str) -> str:
    """The top package of a module under bridgectl (`training` for bridgectl.training.runner, `errors`)."""
    return module.split(".")[1] if "." in module else ""


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    found = []
    for module, edges in graph.items():
        source = package_of(module)
        for target, line in edges.items():
            goal = package_of(target)
            if source in LEVEL and goal in LEVEL and goal != source and LEVEL[goal] <= LEVEL[source]:
                found.append(f"{module}:{line} ({source}) imports {target} ({goal})")
    return found


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): modules that import each other, however
    indirectly."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_every_package_imports_only_the_layers_below_it():
    graph = import_graph()
    assert {package_of(module) for module in graph} - {""} == set(LEVEL) | {"__main__"}  # no package unplaced
    assert upward_imports(graph) == []


def test_no_module_imports_itself_back():
    assert cycles(import_graph()) == []


def test_the_top_level_holds_only_the_entry_points_and_errors():
    assert sorted(path.name for path in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py", "errors.py"]


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path):
    """The walk itself: an upward import, at module level or inside a function, absolute or relative, is found, and
    two modules importing each other (lazily) are a cycle."""
    core = PACKAGE / "core"
    probe = core / "_probe_upward.py"
    probe.write_text(
        "from bridgectl.stages import STAGES\n\ndef f():\n    from ..tasks import make_task\n"
        "    from bridgectl.training import runner\n"
    )
    try:
        modules = [module for _, module in imported_modules(probe)]
        upward = upward_imports(import_graph())
    finally:
        probe.unlink()
    assert "bridgectl.stages" in modules and "bridgectl.tasks" in modules and "bridgectl.training.runner" in modules
    assert any(line.startswith("bridgectl.core._probe_upward:4 (core) imports bridgectl.tasks") for line in upward)
    graph = {
        "bridgectl.config.a": {"bridgectl.config.b": 1},
        "bridgectl.config.b": {"bridgectl.config.a": 9},
        "bridgectl.config.c": {"bridgectl.config.a": 2},
    }
    assert cycles(graph) == [["bridgectl.config.a", "bridgectl.config.b"]]
    assert upward_imports({"bridgectl.training.x": {"bridgectl.analysis.y": 3}}) == [
        "bridgectl.training.x:3 (training) imports bridgectl.analysis.y (analysis)"
    ]


def test_each_stage_owns_its_config_section_and_the_shared_schema_holds_none():
    import bridgectl.config.compose as config
    import bridgectl.config.schema as schema

    shared = {item.name for item in fields(schema.SharedConfig)}
    for kind, info in STAGES.items():
        if info.config is None:  # sft and rl: the shared sft.* and rl.* sections, read by many stages
            assert kind in shared, kind
            continue
        assert kind not in shared, f"the shared schema has stage {kind}'s section"
        assert info.config.__module__ == f"bridgectl.stages.{kind}_config", kind  # beside stages/<kind>.py
        assert info.check is not None and info.check.__module__ == info.config.__module__, kind
        assert kind in {item.name for item in fields(schema.Config)}
    defined = {
        node.name
        for module in (config, schema)
        for node in ast.parse(Path(module.__file__).read_text()).body
        if isinstance(node, ast.ClassDef)
    }
    assert defined.isdisjoint(info.config.__name__ for info in STAGES.values() if info.config)


def test_composing_a_config_imports_neither_torch_nor_an_update_rule():
    """Config composition (every `bridgectl` command, sweeps' spec checks) stays fast: the registry and every
    stage's config module are torch-free."""
    code = (
        "import sys\nfrom bridgectl.config.compose import compose\n"
        "for recipe in ('bridge', 'luffy', 'relift', 'uft', 'interleaved'):\n"
        "    compose([f'recipe={recipe}'])\n"
        "rules = [m for m in sys.modules if m.startswith('bridgectl.stages.') and not m.endswith('_config')]\n"
        "print('torch' in sys.modules, rules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False []"


def test_every_stage_class_lives_where_its_registry_entry_says():
    for info in STAGES.values():
        module = importlib.import_module(f"bridgectl.stages.{info.module}")
        assert getattr(module, info.cls).__module__ == module.__name__
