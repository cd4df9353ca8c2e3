"""The cores a test runs on: the native one only where it builds on this machine."""

from __future__ import annotations

import pytest

from gradtrace import _native

NATIVE, PYTHON = _native.NATIVE, _native.PYTHON

needs_native = pytest.mark.skipif(
    _native.load() is None, reason=f"no native core here: {_native.status().reason}"
)

# Every test parametrized by core runs on both: they must give the same answers.
CORES = [pytest.param(NATIVE, marks=needs_native), PYTHON]
