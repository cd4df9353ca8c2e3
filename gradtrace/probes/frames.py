"""Find the user's line of code behind an op: the first frame outside torch and gradtrace."""

from __future__ import annotations

import linecache
import os
import sys
import sysconfig
from types import CodeType, FrameType

import torch

from gradtrace.events import SourceLine


def _dir_prefix(path: str) -> str:
    return os.path.realpath(path) + os.sep


_LIBRARY_DIRS = (
    _dir_prefix(os.path.dirname(torch.__file__)),
    _dir_prefix(os.path.dirname(os.path.dirname(__file__))),
)
_STDLIB_DIR = _dir_prefix(sysconfig.get_paths()["stdlib"])
# Installed packages can live under the stdlib folder (pyenv, system Pythons): user code.
_PACKAGE_DIRS = tuple({_dir_prefix(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")})

# IPython's terminal names a cell's code "<ipython-input-N-HASH>" and keeps its lines in
# linecache: the user's code (Jupyter kernels name cells after files in a temporary folder).
IPYTHON_CELL = "<ipython-input-"

# Lines shown either side of a culprit line in reports.
CONTEXT_LINES = 2

Caller = tuple[CodeType, int]


def is_user_code(code: CodeType) -> bool:
    filename = code.co_filename
    if filename.startswith("<"):
        return filename.startswith(IPYTHON_CELL)
    path = os.path.realpath(filename)
    if path.startswith(_LIBRARY_DIRS):
        return False
    return not path.startswith(_STDLIB_DIR) or path.startswith(_PACKAGE_DIRS)


class CallerFinder:
    """Walks the Python stack to the first user frame, deciding once per code object.

    Only the code object and line number are kept: a frame object would keep the user's
    locals (and their tensors) alive.

    NOTE [code objects by id]: verdicts are keyed by `id(code)`, not by the code object:
    hashing a code object hashes its contents every time (about 0.5 µs, per frame walked,
    for every saved tensor). Each entry keeps its code object, so its id cannot be reused.
    """

    def __init__(self) -> None:
        self._is_user: dict[int, tuple[CodeType, bool]] = {}

    def caller(self) -> Caller | None:
        frame = self._user_frame(sys._getframe(1))
        return None if frame is None else (frame.f_code, frame.f_lineno)

    def caller_and_self(self) -> tuple[Caller | None, object]:
        """The first user frame, as `caller()`, and the `self` it runs with (None for a plain
        function): which object's code issued the op. Reading a frame's locals costs a dict,
        so this is for rare events only (a write that hit saved memory)."""
        frame = self._user_frame(sys._getframe(1))
        if frame is None:
            return None, None
        return (frame.f_code, frame.f_lineno), frame_self(frame)

    def _user_frame(self, frame: FrameType | None) -> FrameType | None:
        is_user = self._is_user
        while frame is not None:
            code = frame.f_code
            entry = is_user.get(id(code))
            if entry is None:
                entry = is_user[id(code)] = (code, is_user_code(code))
            if entry[1]:
                return frame
            frame = frame.f_back
        return None


def frame_self(frame: FrameType) -> object:
    """The frame's first argument when it is called `self`, else None."""
    code = frame.f_code
    if code.co_argcount == 0 or code.co_varnames[0] != "self":
        return None
    return frame.f_locals.get("self")


def file_name(filename: str) -> str:
    """How findings name a code object's file: the absolute path, or for code typed into
    IPython the name its own tracebacks use ("Cell In[3]"; a Jupyter kernel compiles each
    cell to a file in a temporary folder, a name nobody recognises)."""
    ipython = sys.modules.get("IPython")
    if ipython is not None:
        try:
            shell = ipython.get_ipython()
            named = None if shell is None else shell.compile.format_code_name(filename)
        except Exception:  # an IPython without the name (older, or another shell)
            named = None
        if named is not None:
            return " ".join(named)
    return _path(filename)


def _path(filename: str) -> str:
    """Where linecache finds a code object's lines: a pseudo-file's name ("<ipython-input-")
    as it is, a file's absolute path (the program may have changed directory)."""
    return filename if filename.startswith("<") else os.path.abspath(filename)


def source_line(caller: Caller | None, *, context: int = CONTEXT_LINES) -> SourceLine | None:
    """Resolve a caller to file, line, function and `context` source lines either side."""
    if caller is None:
        return None
    code, line = caller
    name = code.co_filename
    path = _path(name)
    start = max(1, line - context)
    lines = tuple(linecache.getline(path, n).rstrip("\n") for n in range(start, line + context + 1))
    return SourceLine(
        file=file_name(name),
        line=line,
        function=getattr(code, "co_qualname", code.co_name),
        code=linecache.getline(path, line).strip(),
        context_start=start,
        context=lines,
    )
