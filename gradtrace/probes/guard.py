"""A probe that fails never breaks training: every entry point of a probe runs behind its guard.

NOTE [probe boundary]: torch calls probes from hooks (module forward pre/post hooks,
optimizer step hooks, tensor and grad-accumulation hooks, saved-tensor pack/unpack, the
write log's dispatch mode) and from the wrappers gradtrace puts around `clip_grad_norm_` and
`GradScaler.update`; the store thread calls them back with values read late. An exception
escaping any of these would surface in the user's forward, backward or `optimizer.step()`,
so each probe hands torch only callables wrapped by its `ProbeGuard`. On the probe's first
exception the guard switches the probe off for the rest of the run (a probe that failed
half-way cannot be trusted to be consistent), reports a `ProbeFailure` once, and returns what
"no change" means to torch: None, or the probe's `fallback`. Training goes on as if the
probe had never been installed.

Three kinds of exception pass through unchanged: those that are not `Exception`
(KeyboardInterrupt, SystemExit), those marked `deliberate` (the saved-tensor check's
in-place RuntimeError, which stands for PyTorch's own), and the user's own, which never
reach a guard: user code that a probe calls (an optimizer closure, the original
`clip_grad_norm_`) runs outside the guarded part.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, TypeVar

from gradtrace.events import ProbeFailure

E = TypeVar("E", bound=BaseException)
F = TypeVar("F", bound=Callable[..., Any])

# Bound on a stored exception message: a failure report must stay small.
MAX_MESSAGE_CHARS = 500

_DELIBERATE = "_gradtrace_deliberate"
_GUARD_FILE = os.path.abspath(__file__)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(_GUARD_FILE))


def deliberate(error: E) -> E:
    """Mark an exception a probe raises on purpose, for the user: guards let it through."""
    setattr(error, _DELIBERATE, True)
    return error


def is_deliberate(error: BaseException) -> bool:
    return getattr(error, _DELIBERATE, False)


class ProbeGuard:
    """The on/off switch of one probe, and the wrapper for the callables it gives torch.

    `on_failure` receives the failure once, when the probe switches off; without one, the
    failure is printed on stderr (a probe used outside a session).
    """

    __slots__ = ("_on_failure", "_step", "on", "probe")

    def __init__(
        self,
        probe: str,
        on_failure: Callable[[ProbeFailure], None] | None = None,
        *,
        step: Callable[[], int] = lambda: 0,
    ) -> None:
        self.probe = probe
        self.on = True
        self._on_failure = on_failure
        self._step = step

    def __call__(self, function: F, *, fallback: Callable[..., Any] | None = None) -> F:
        """`function`, run only while the probe is on; its exception switches the probe off.

        When off (or on the call that failed) the wrapper returns `fallback(*args)`, or None.
        Positional arguments only, as torch calls hooks: `**kwargs` would cost every call
        (this runs per module call, saved tensor and write).
        """
        guard = self

        @functools.wraps(function)
        def guarded(*args: Any) -> Any:
            if guard.on:
                try:
                    return function(*args)
                except Exception as error:
                    if is_deliberate(error):
                        raise
                    guard.fail(error)
            return None if fallback is None else fallback(*args)

        return guarded  # type: ignore[return-value]

    def fail(self, error: Exception) -> None:
        """Switch the probe off and report why (once)."""
        if not self.on:
            return
        self.on = False
        failure = ProbeFailure(
            probe=self.probe,
            step=self._step(),
            error=type(error).__qualname__,
            message=str(error).strip()[:MAX_MESSAGE_CHARS],
            where=_where(error),
        )
        try:
            if self._on_failure is None:
                print(f"gradtrace: {failure.describe()}", file=sys.stderr)
            else:
                self._on_failure(failure)
        except Exception as report_error:  # the report itself must not break training either
            print(
                f"gradtrace: {failure.describe()} (not recorded: {report_error})", file=sys.stderr
            )


def _where(error: BaseException) -> str:
    """The innermost frame of gradtrace's code (past the guard) the exception passed through;
    the innermost frame of all when it passed through none (a callable patched in)."""
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if os.path.abspath(frame.filename) != _GUARD_FILE
    ]
    if not frames:
        return "an unknown place"
    inside = [frame for frame in frames if frame.filename.startswith(_PACKAGE_DIR + os.sep)]
    frame = (inside or frames)[-1]
    path = frame.filename
    if inside:
        path = os.path.relpath(path, os.path.dirname(_PACKAGE_DIR)).replace(os.sep, "/")
    return f"{path}:{frame.lineno} in {frame.name}"


class GuardedProbe:
    """A probe whose installation is one more entry point behind its guard.

    Installing registers hooks and looks up torch internals (FSDP2's, the compiler's); a
    torch that moved them must not stop the run from starting. A probe that fails as it
    installs is off from the start, reported like any other failure, and whatever it had
    registered is still unwound with the session's stack (its hooks do nothing: the guard is
    off). Subclasses set `_guard` and implement `_install`.
    """

    _guard: ProbeGuard

    def install(self, stack: ExitStack) -> None:
        self._guard(self._install)(stack)

    def _install(self, stack: ExitStack) -> None:
        raise NotImplementedError
