"""Jupyter front end: `%load_ext gradtrace`, then `%%gradtrace [--level light] [--out DIR]`.

The magic traces one cell with the same session as `gradtrace run` (every module and
optimizer the cell calls is seen; the model and optimizer live in the kernel across cells),
then shows the report inline as HTML. The cell's own exception propagates as IPython shows
any other, after the report. IPython is imported only here, and only by IPython itself
(`load_ipython_extension`): `import gradtrace` never needs it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import shlex
from pathlib import Path
from typing import Any, NoReturn

from gradtrace.api import Trace
from gradtrace.errors import GradtraceError
from gradtrace.options import DEFAULT_LEVEL, LEVELS
from gradtrace.reporters.notebook import run_html
from gradtrace.store import reader
from gradtrace.store.reader import Run

# The cell's trace, in the kernel's namespace once the cell ran (its findings, run_dir).
TRACE_NAME = "_gradtrace"


class _ShownRun(Run):
    """A run that a notebook shows as its HTML report (what `gradtrace.load_run` returns)."""

    def _repr_html_(self) -> str:
        return run_html(self)

    def __repr__(self) -> str:
        count = len(self.findings)
        return (
            f"<gradtrace.Run {str(self.path)!r} {self.status} · {self.steps} steps · "
            f"{count} stored finding{'s' if count != 1 else ''}>"
        )


def load_run(path: str | Path) -> Run:
    """Open a run directory written by `gradtrace run` (or any gradtrace front end).

    A torchrun job's directory (one `rank-N` run per rank) opens as one merged run. In a
    notebook the run shows as its HTML report.
    """
    run = reader.load_run(path)
    return _ShownRun(**{field.name: getattr(run, field.name) for field in dataclasses.fields(run)})


class _Parser(argparse.ArgumentParser):
    """The magic's options; a bad one is a one-line usage error, never SystemExit."""

    def error(self, message: str) -> NoReturn:
        raise GradtraceError(f"{self.prog}: {message}.")


def parse_options(line: str) -> argparse.Namespace:
    """`--level light|full` and `--out DIR` from the magic's line."""
    parser = _Parser(prog="%%gradtrace", add_help=False)
    parser.add_argument("--level", choices=LEVELS, default=DEFAULT_LEVEL)
    parser.add_argument("--out", type=Path, default=None)
    try:
        words = shlex.split(line)
    except ValueError as error:
        raise GradtraceError(f"%%gradtrace: {error}.") from None
    return parser.parse_args(words)


def register_magic(ipython: Any) -> None:
    """Add `%%gradtrace` to `ipython` (an InteractiveShell)."""
    from IPython.core.error import UsageError

    def gradtrace(line: str, cell: str) -> Any:
        __tracebackhide__ = True  # IPython's traceback starts at the cell's own frames
        try:
            options = parse_options(line)
        except GradtraceError as error:
            raise UsageError(str(error)) from None
        return trace_cell(ipython, cell, options, argv=["%%gradtrace", *shlex.split(line)])

    ipython.register_magic_function(gradtrace, magic_kind="cell", magic_name="gradtrace")


def trace_cell(ipython: Any, cell: str, options: argparse.Namespace, *, argv: list[str]) -> Any:
    """Run `cell` in the kernel's namespace under a trace, show the report, return the value
    of the cell's last expression (IPython shows it as the cell's result).

    `argv`: what the run records as run (the magic's line; the kernel's own argv says nothing).
    """
    __tracebackhide__ = True
    from IPython.core.error import UsageError
    from IPython.display import display

    source = ipython.transform_cell(cell)  # %magics and !commands inside the cell
    # Cached under a name of IPython's, so tracebacks and gradtrace's code excerpts show the
    # cell's lines.
    filename = ipython.compile.cache(source, ipython.execution_count)
    tree = ast.parse(source, filename)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    body = compile(tree, filename, "exec")
    result = None if last is None else compile(ast.Expression(last.value), filename, "eval")
    trace = Trace(
        out=options.out, name="notebook", front_end="notebook", argv=argv, level=options.level
    )
    try:
        trace.start()
    except GradtraceError as error:  # another trace runs: one line, and the cell does not run
        raise UsageError(f"%%gradtrace: {error}") from None
    namespace = ipython.user_ns
    namespace[TRACE_NAME] = trace
    try:
        exec(body, ipython.user_global_ns, namespace)
        value = None if result is None else eval(result, ipython.user_global_ns, namespace)
    except BaseException as error:
        trace.stop(exception=error)
        display(trace)
        raise
    trace.stop()
    display(trace)
    return value
