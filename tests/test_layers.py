"""Dependencies point one way: front ends -> probes -> store -> analysis -> reporters."""

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
