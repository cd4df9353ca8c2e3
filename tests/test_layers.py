"""Dependencies point one way: front ends -> probes -> store -> analysis -> reporters.

Within the probes, no probe knows another: each imports only the shared machinery, and the
session wires probes together with plain callables.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "gradtrace"

# For each layer, the imports it must never make.
FORBIDDEN = {
    "analysis": ("torch", "gradtrace.probes", "gradtrace.store.writer", "gradtrace.reporters"),
    "reporters": ("torch", "gradtrace.probes", "gradtrace.session", "gradtrace.runner"),
    "store": ("torch", "gradtrace.probes", "gradtrace.reporters"),
    "probes": ("gradtrace.reporters", "gradtrace.store", "gradtrace.cli", "gradtrace.runner"),
}

# The probe modules every probe may import: shared machinery (the module stack, the step
# counter, frames, gradtrace's own ops, guards, private torch APIs, the deferred queue) and
# the saved-tensor records the write logs attach writes to.
SHARED_PROBE_MODULES = frozenset(
    {"modules", "steps", "frames", "own_ops", "guard", "_torch_compat", "deferred", "saved"}
)


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downstream(layer: str) -> None:
    files = sorted((PACKAGE / layer).glob("*.py"))
    assert files
    for path in files:
        for name in imports_of(path):
            for forbidden in FORBIDDEN[layer]:
                assert not (name == forbidden or name.startswith(forbidden + ".")), (
                    f"{path.name} imports {name}"
                )


def probe_modules_imported_by(path: Path) -> set[str]:
    """The `gradtrace.probes` modules a file imports, by name, type-checking imports too."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            package = "gradtrace.probes" if node.level else ""
            module = ".".join(part for part in (package, node.module) if part)
            # `from gradtrace.probes import x` imports the module x.
            modules = [f"{module}.{alias.name}" for alias in node.names]
            modules.append(module)
        else:
            continue
        names.update(name.split(".")[2] for name in modules if name.startswith("gradtrace.probes."))
    return names


def test_no_probe_imports_another_probe() -> None:
    files = sorted((PACKAGE / "probes").glob("*.py"))
    assert len(files) > len(SHARED_PROBE_MODULES)
    for path in files:
        others = probe_modules_imported_by(path) - SHARED_PROBE_MODULES - {path.stem}
        assert not others, f"{path.name} imports the probe module(s) {sorted(others)}"


def import_graph(package: Path) -> dict[str, set[str]]:
    """Each module of `package` -> the modules of `package` it imports (type-checking
    imports too), by dotted name; `from pkg import mod` counts as importing `pkg.mod`."""
    root = package.parent
    modules: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        home = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: list[str] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                anchor = home.split(".")[: len(home.split(".")) - node.level + 1]
                base = ".".join([*anchor, node.module or ""] if node.level else [node.module or ""])
                base = base.rstrip(".")
                named = [f"{base}.{alias.name}" for alias in node.names]
                targets += [full if full in modules else base for full in named]
        imported: set[str] = set()
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                imported.add(target)
        graph[name] = imported
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every set of modules that import each other round in a circle (Tarjan's algorithm)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        for other in graph[module]:
            if other not in order:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], order[other])
        if low[module] == order[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in order:
            visit(module)
    return circles


def test_no_import_circle() -> None:
    graph = import_graph(PACKAGE)
    assert "gradtrace.session" in graph and "gradtrace.reporters.terminal" in graph
    assert import_circles(graph) == []


def test_import_circles_are_found(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("from . import c\n")
    (package / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nimport pkg.a\n")
    (package / "d.py").write_text("from pkg import a\n")
    assert import_circles(import_graph(package)) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]


def test_session_renders_nothing() -> None:
    """The session collects and hands records to sinks; no reporter is among its imports,
    direct or indirect (front ends wire live TensorBoard, trace.json and the summary in)."""
    graph = import_graph(PACKAGE)
    seen, todo = set(), ["gradtrace.session"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph[module]
    assert "gradtrace.store.writer" in seen and "gradtrace.sinks" in seen
    reporters = sorted(module for module in seen if module.startswith("gradtrace.reporters"))
    assert reporters == []
