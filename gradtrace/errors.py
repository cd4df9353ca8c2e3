"""The one error type gradtrace raises for bad input, with the exit code it maps to."""

from __future__ import annotations


class GradtraceError(Exception):
    """A problem with the user's input that deserves one clear line, not a traceback.

    Usage errors exit 2 (click's convention); everything else defaults to 2 as well, since
    gradtrace only raises this for input it cannot use.
    """

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
