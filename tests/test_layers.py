"""The house's layers, checked from the source: the core imports nothing above it, each stage owns its config
section (beside its update rule, torch-free), and the shared config holds no stage's section."""

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
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{alias.name}") for alias in node.names
                                                if module == "bridgectl"]
    return found


def test_the_core_imports_nothing_above_it():
    upward = []
    for path in sorted((PACKAGE / "core").rglob("*.py")):
        for line, module in imported_modules(path):
            inside = module == "bridgectl.core" or module.startswith("bridgectl.core.") or module == "bridgectl.errors"
            if module.startswith("bridgectl") and not inside:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert upward == []


def test_the_import_walk_sees_an_upward_import(tmp_path):
    """The walk itself: an upward import, at module level or inside a function, absolute or relative, is found."""
    core = PACKAGE / "core"
    probe = core / "_probe_upward.py"
    probe.write_text("from bridgectl.stages import STAGES\n\ndef f():\n    from ..tasks import make_task\n"
                     "    from bridgectl import runner\n")
    try:
        modules = [module for _, module in imported_modules(probe)]
    finally:
        probe.unlink()
    assert "bridgectl.stages" in modules and "bridgectl.tasks" in modules and "bridgectl.runner" in modules


def test_each_stage_owns_its_config_section_and_the_shared_schema_holds_none():
    import bridgectl.config as config
    import bridgectl.schema as schema

    shared = {item.name for item in fields(schema.SharedConfig)}
    for kind, info in STAGES.items():
        if info.config is None:  # sft and rl: the shared sft.* and rl.* sections, read by many stages
            assert kind in shared, kind
            continue
        assert kind not in shared, f"the shared schema has stage {kind}'s section"
        assert info.config.__module__ == f"bridgectl.stages.{kind}_config", kind  # beside stages/<kind>.py
        assert info.check is not None and info.check.__module__ == info.config.__module__, kind
        assert kind in {item.name for item in fields(schema.Config)}
    defined = {node.name for module in (config, schema)
               for node in ast.parse(Path(module.__file__).read_text()).body if isinstance(node, ast.ClassDef)}
    assert defined.isdisjoint(info.config.__name__ for info in STAGES.values() if info.config)


def test_composing_a_config_imports_neither_torch_nor_an_update_rule():
    """Config composition (every `bridgectl` command, sweeps' spec checks) stays fast: the registry and every
    stage's config module are torch-free."""
    code = ("import sys\nfrom bridgectl.config import compose\n"
            "for recipe in ('bridge', 'luffy', 'relift', 'uft', 'interleaved'):\n"
            "    compose([f'recipe={recipe}'])\n"
            "rules = [m for m in sys.modules if m.startswith('bridgectl.stages.') and not m.endswith('_config')]\n"
            "print('torch' in sys.modules, rules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False []"


def test_every_stage_class_lives_where_its_registry_entry_says():
    for kind, info in STAGES.items():
        module = importlib.import_module(f"bridgectl.stages.{info.module}")
        assert getattr(module, info.cls).__module__ == module.__name__
