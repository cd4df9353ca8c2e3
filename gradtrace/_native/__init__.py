"""The compiled core: built against the installed torch on first use, cached, optional.

`core.cpp` holds what runs per saved tensor and per written tensor (see its header). It is
compiled with torch's own extension builder (a C++ compiler and `ninja`, no nvcc) into a
cache directory keyed by the source, torch and Python, so a new torch gets a new build and
an unchanged one loads in milliseconds. When it cannot be built or loaded, gradtrace runs
on the Python probes and says why (`gradtrace info`).

NOTE [choosing a core]: `GRADTRACE_CORE=python` forces the Python probes, `native` makes a
failed build an error; anything else (the default) takes the native core where it builds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from gradtrace.errors import GradtraceError
from gradtrace.probes import _torch_compat

MODULE_NAME = "_gradtrace_core"
SOURCE = Path(__file__).with_name("core.cpp")
CORE_ENV = "GRADTRACE_CORE"
CACHE_ENV = "GRADTRACE_CACHE"
_FLAGS = ("-O2", "-DNDEBUG")

NATIVE = "native"
PYTHON = "python"


@dataclass(frozen=True)
class CoreStatus:
    """Which core a session gets, and why."""

    name: str  # NATIVE or PYTHON
    reason: str  # why the Python core, or where the native one was loaded from
    build_dir: Path


_loaded: ModuleType | None = None
_status: CoreStatus | None = None


def build_dir() -> Path:
    """The cache directory for this source, torch and Python."""
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gradtrace"
    )
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:12]
    torch_tag = torch.__version__.replace("+", "-")
    return Path(base) / f"native-{torch_tag}-py{platform.python_version()}-{digest}"


def load(*, announce: bool = True) -> ModuleType | None:
    """The compiled core, built first if needed; None where it cannot be had (see status())."""
    global _loaded, _status
    if _status is not None:
        return _loaded
    where = build_dir()
    choice = os.environ.get(CORE_ENV, "").strip().lower()
    if choice == PYTHON:
        _status = CoreStatus(PYTHON, f"{CORE_ENV}=python", where)
        return None
    try:
        _torch_compat.check_native_supported()
        _loaded = _import_built(where) or _build(where, announce=announce)
        _loaded.observe_ops()
    except Exception as error:  # a missing compiler, headers, ninja, or an unknown torch
        reason = _one_line(error)
        if choice == NATIVE:
            raise GradtraceError(
                f"The native core could not be built or loaded ({reason}); unset {CORE_ENV} "
                "to run on the Python probes."
            ) from error
        _loaded = None
        _status = CoreStatus(PYTHON, f"native core unavailable: {reason}", where)
        if announce:
            print(f"gradtrace: {_status.reason}; tracing on the Python probes.", file=sys.stderr)
        return None
    _status = CoreStatus(NATIVE, f"loaded from {where}", where)
    return _loaded


def status() -> CoreStatus:
    """The core `load()` chose (loading it first if no session asked yet)."""
    load()
    assert _status is not None
    return _status


def observing() -> bool:
    """Whether the native write observer is on for this thread (tests check none is left)."""
    return _loaded is not None and _loaded.observing()


def _import_built(where: Path) -> ModuleType | None:
    """Import an existing build without importing torch's extension builder (slow to import).

    torch's builder names the library `<name>.so` on Linux and macOS, `<name>.pyd` on Windows.
    """
    for suffix in (".so", ".pyd"):
        path = where / f"{MODULE_NAME}{suffix}"
        if path.is_file():
            return _import_file(path)
    return None


def _import_file(path: Path) -> ModuleType:
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[MODULE_NAME] = module
    return module


def _build(where: Path, *, announce: bool) -> ModuleType:
    from torch.utils import cpp_extension

    if announce:
        print(
            f"gradtrace: building the native core for torch {torch.__version__} "
            f"(once, about a minute) into {where}",
            file=sys.stderr,
            flush=True,
        )
    where.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=MODULE_NAME,
        sources=[str(SOURCE)],
        build_directory=str(where),
        extra_cflags=list(_FLAGS),
        is_python_module=True,
        verbose=False,
    )


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() and line != lines[0]:
            return f"{type(error).__name__}: {line}"[:300]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
