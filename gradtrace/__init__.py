"""gradtrace: a debugging profiler for PyTorch training loops.

The public names load on first use (PEP 562): pytest imports this package for gradtrace's
plugin in every test run of an environment where gradtrace is installed, and that must not
import torch unless `--gradtrace` or the `gradtrace` fixture asks for tracing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradtrace.api import Trace, start, trace
    from gradtrace.errors import GradtraceError
    from gradtrace.events import Finding
    from gradtrace.notebook import load_run
    from gradtrace.options import RunOptions
    from gradtrace.session import Session
    from gradtrace.silencing import ignore
    from gradtrace.store import Run

__version__ = "0.1.0"

# Public name -> the module that defines it.
_PUBLIC = {
    "Finding": "gradtrace.events",
    "GradtraceError": "gradtrace.errors",
    "Run": "gradtrace.store",
    "RunOptions": "gradtrace.options",
    "Session": "gradtrace.session",
    "Trace": "gradtrace.api",
    "ignore": "gradtrace.silencing",
    "load_run": "gradtrace.notebook",
    "start": "gradtrace.api",
    "trace": "gradtrace.api",
}

__all__ = [
    "Finding",
    "GradtraceError",
    "Run",
    "RunOptions",
    "Session",
    "Trace",
    "__version__",
    "ignore",
    "load_ipython_extension",
    "load_run",
    "start",
    "trace",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'gradtrace' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext gradtrace`: adds the `%%gradtrace` cell magic (see gradtrace.notebook)."""
    from gradtrace.notebook import register_magic

    register_magic(ipython)
