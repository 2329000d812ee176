"""The package's layers only point down (docs/architecture.md): every import of every module, those inside
functions included, goes to the same or a lower layer, and no modules import each other in a circle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cifarlab"

# Lowest first; a module's layer is that of its longest listed prefix (docs/architecture.md says why each is where).
LAYERS: list[tuple[str, ...]] = [
    ("cifarlab", "cifarlab.errors", "cifarlab.io", "cifarlab.hardware", "cifarlab.metrics"),
    ("cifarlab.models",),
    ("cifarlab.config",),
    ("cifarlab.data",),
    ("cifarlab.report", "cifarlab.environment"),
    ("cifarlab.train",),
    ("cifarlab.privacy", "cifarlab.uncertainty"),
    ("cifarlab.train.run", "cifarlab.train.bench", "cifarlab.uncertainty.train", "cifarlab.privacy.audit", "cifarlab.privacy.randp",
     "cifarlab.export"),
    ("cifarlab.continual",),
    ("cifarlab.cli", "cifarlab.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    matches = [(len(prefix), i) for i, names in enumerate(LAYERS) for prefix in names
               if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")
    return max(matches)[1]


def imports(module: str) -> set[str]:
    """The package's modules that `module` imports anywhere in its file (`from a import b` counts as a.b when b is
    a module, else as a)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {name for name in found if name in MODULES and name != module}


def packages_run_by(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


GRAPH = {module: imports(module) for module in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_to_the_same_or_a_lower_layer(module):
    own = layer(module)
    upward = sorted(f"{target} (layer {layer(target)})" for name in GRAPH[module]
                    for target in (name, *packages_run_by(name)) if layer(target) > own)
    assert not upward, f"{module} (layer {own}) imports from higher layers: {', '.join(upward)}"


def test_no_import_cycles():
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    source = "def f():\n    from cifarlab.train.engine import fit\n"
    found = {alias.module for alias in ast.walk(ast.parse(source)) if isinstance(alias, ast.ImportFrom)}
    assert found == {"cifarlab.train.engine"}
    assert layer("cifarlab.train.run") > layer("cifarlab.privacy.dpsgd") > layer("cifarlab.train.engine")
    assert layer("cifarlab.data.loader") > layer("cifarlab.config") > layer("cifarlab.models.per_example")
