"""Run a user's script or module as `__main__`, exactly as `python` would, under a session."""

from __future__ import annotations

import builtins
import importlib.machinery
import io
import os
import runpy
import sys
import traceback
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gradtrace.errors import GradtraceError
from gradtrace.session import Session, describe_exception
from gradtrace.store.format import FAILED, INTERRUPTED, OK

# Exit status a shell reports for a process interrupted by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130

_GRADTRACE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


@dataclass(frozen=True)
class Target:
    """What to run: a script path or, with `module=True`, a dotted module name."""

    name: str
    args: tuple[str, ...]
    module: bool = False

    def check(self) -> None:
        """Refuse a script `python` could not open, as it does (exit 2), before a run
        directory exists: nothing ran, so there is no run to keep."""
        if self.module:
            return
        if not os.path.isfile(self.name):
            raise GradtraceError(f"No such script: '{self.name}'.")
        try:
            with io.open_code(os.path.abspath(self.name)):
                pass
        except OSError as error:
            raise GradtraceError(f"Cannot open script '{self.name}': {error.strerror}.") from None

    @property
    def label(self) -> str:
        return self.name if self.module else os.path.basename(self.name)


def run_target(target: Target, session: Session) -> int:
    """Run the target under the session and return the exit code `python` would have given.

    The script's own exception is printed as Python prints it (minus gradtrace's frames); the
    session is closed with the outcome before this returns, on every path.
    """
    try:
        with _as_main(target):
            session.start()
            _execute(target)
    except SystemExit as exc:
        code = _exit_code(exc)
        session.close(status=OK if code == 0 else FAILED, exit_code=code)
        return code
    except KeyboardInterrupt as exc:
        _print_user_traceback(exc)
        session.close(
            status=INTERRUPTED, exit_code=EXIT_INTERRUPTED, exception=describe_exception(exc)
        )
        return EXIT_INTERRUPTED
    except GradtraceError:
        session.close(status=FAILED, exit_code=2)
        raise
    except BaseException as exc:
        _print_user_traceback(exc)
        session.record_error(exc)
        session.close(status=FAILED, exit_code=1, exception=describe_exception(exc))
        return 1
    session.close(status=OK, exit_code=0)
    return 0


def _execute(target: Target) -> None:
    if target.module:
        runpy.run_module(target.name, run_name="__main__", alter_sys=True)
    else:
        _run_file(target.name)


def _run_file(path: str) -> None:
    """Execute a script file as `__main__`, the way the interpreter does.

    Not `runpy.run_path`: it rewrites sys.argv[0] to the absolute path, which `python
    script.py` does not. Like the interpreter, code and `__file__` carry the absolute path
    and the module is `sys.modules["__main__"]` while it runs, so pickling (DataLoader
    workers, torch.save of script-defined classes) finds it.
    """
    filename = os.path.abspath(path)
    with io.open_code(filename) as source:
        code = compile(source.read(), filename, "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    main.__file__ = filename
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", filename)
    main.__builtins__ = builtins
    previous = sys.modules["__main__"]
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    finally:
        sys.modules["__main__"] = previous


@contextmanager
def _as_main(target: Target) -> Iterator[None]:
    """Give the script the argv and sys.path[0] that `python script.py` would."""
    saved_argv, saved_path0 = sys.argv[:], sys.path[0]
    sys.argv = [target.name, *target.args]
    sys.path[0] = os.getcwd() if target.module else os.path.dirname(os.path.abspath(target.name))
    try:
        yield
    finally:
        sys.argv, sys.path[0] = saved_argv, saved_path0


def _exit_code(exc: SystemExit) -> int:
    """Map SystemExit to an exit status the way the interpreter does."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _print_user_traceback(exc: BaseException) -> None:
    """Print the exception as Python would, without the frames that started the script.

    Only those leading frames (gradtrace's runner and runpy) are left out: a traceback that
    passes through gradtrace's code after the script started keeps those frames, so an
    error of gradtrace's never reads as the user's own.
    """
    report = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    _drop_own_frames(report, seen=set())
    sys.stderr.flush()
    print("".join(report.format()), end="", file=sys.stderr)
    sys.stderr.flush()


def _drop_own_frames(report: traceback.TracebackException, seen: set[int]) -> None:
    if id(report) in seen:
        return
    seen.add(id(report))
    frames = list(report.stack)
    while frames and _is_own_frame(frames[0].filename):
        frames.pop(0)
    report.stack = traceback.StackSummary.from_list(frames)
    for chained in (report.__cause__, report.__context__):
        if chained is not None:
            _drop_own_frames(chained, seen)


def _is_own_frame(filename: str) -> bool:
    return (
        filename.startswith(_GRADTRACE_DIR)
        or filename in ("<frozen runpy>",)
        or (filename.endswith(os.sep + "runpy.py"))
    )
