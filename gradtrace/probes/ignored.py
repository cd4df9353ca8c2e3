"""The source lines `with gradtrace.ignore(...)` blocks cover, for analysis/silence.py.

A block is found from the line that entered it: the innermost `with` statement of that
file whose header holds the line, as Python's own parser reads the file (linecache, so
notebook cells work too). Its lines, not the calls made from them, are what it silences,
as a linter's suppression comment would; each block is parsed once per process. A session
stores the blocks open as it starts and those entered while it runs.
"""

from __future__ import annotations

import ast
import linecache
import threading
from typing import Any

from gradtrace.probes.frames import file_name

_lock = threading.Lock()
# (file, line of the `with`) -> first and last line of its block: parsed once per process.
_extents: dict[tuple[str, int], tuple[int, int]] = {}
# Blocks entered and not yet left (on any thread), and those the tracing session collects:
# the ones open as it started and every one entered since. Stored as a run's meta `ignored`.
_open: list[dict[str, Any]] = []
_collected: list[dict[str, Any]] | None = None


def enter(filename: str, line: int, kinds: tuple[str, ...]) -> dict[str, Any]:
    """Record entering the block whose `with` header holds `line` of `filename`."""
    extent = _extents.get((filename, line))
    if extent is None:
        extent = _extents[filename, line] = _with_block(filename, line)
    block = {
        "file": file_name(filename),
        "start": extent[0],
        "end": extent[1],
        "kinds": list(kinds),
    }
    with _lock:
        _open.append(block)
        if _collected is not None and block not in _collected:
            _collected.append(block)
    return block


def leave(block: dict[str, Any]) -> None:
    with _lock:
        if block in _open:
            _open.remove(block)


def collect() -> None:
    """A session starts: collect the blocks open now and those entered until `stop`."""
    global _collected
    with _lock:
        _collected = []
        for block in _open:
            if block not in _collected:
                _collected.append(block)


def collected() -> list[dict[str, Any]]:
    with _lock:
        return [] if _collected is None else list(_collected)


def stop() -> None:
    global _collected
    with _lock:
        _collected = None


def _with_block(filename: str, line: int) -> tuple[int, int]:
    """First and last line of the `with` statement whose header holds `line`; the line
    alone when the source cannot be read or parsed."""
    source = "".join(linecache.getlines(filename))
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return line, line
    best: tuple[int, int] | None = None
    for node in ast.walk(tree):
        if not isinstance(node, (ast.With, ast.AsyncWith)) or node.end_lineno is None:
            continue
        header_end = node.body[0].lineno - 1 if node.body else node.end_lineno
        in_header = node.lineno <= line <= max(header_end, node.lineno)
        if in_header and (best is None or node.lineno >= best[0]):
            best = (node.lineno, node.end_lineno)
    return best or (line, line)
