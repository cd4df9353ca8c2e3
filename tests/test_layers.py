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
