"""Hugging Face Trainer callback: trace `trainer.train()` into a gradtrace run directory.

`transformers` is not a dependency of gradtrace; importing this module without it raises an
ImportError that says how to install it.

NOTE [no exception event]: `TrainerCallback` has no hook for a failed `train()`. A run that
ends by an exception is closed, in this order of preference: by `with callback:` around
`trainer.train()` (records the exception and annotates it), by the next `on_train_begin` of
the same callback, by `callback.close()`, or at interpreter exit.
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from gradtrace.api import CallbackTrace, Trace
from gradtrace.options import DEFAULT_LEVEL
from gradtrace.store.format import FAILED

try:
    from transformers import TrainerCallback
except ImportError as error:
    raise ImportError(
        "gradtrace.hf needs Hugging Face transformers, which is not installed. "
        "Install it with: pip install transformers"
    ) from error


class GradTraceCallback(CallbackTrace, TrainerCallback):
    """Trace training: the run starts at `on_train_begin` and ends at `on_train_end`.

    `out` is the run directory (default `./gradtrace-runs/<time>-<model class>`), `level`
    as for `gradtrace.trace`. Only the world's process zero traces and prints. With
    `summary=True` the terminal summary is printed to stderr when the run ends.
    """

    def __init__(
        self,
        out: str | Path | None = None,
        *,
        level: str = DEFAULT_LEVEL,
        summary: bool = True,
    ) -> None:
        self._set_options(out, level, summary)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.close()  # a previous train() that raised (see NOTE [no exception event])
        self._begin(Trace(kwargs.get("model"), out=self.out, level=self.level, front_end="hf"))
        atexit.register(self._close_at_exit)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish(ended=True)

    def close(self, exception: BaseException | None = None) -> None:
        """Finish a run that `train()` left open, as failed (with `exception` if given).

        Idempotent; a no-op after a `train()` that completed. The exception, if any, gets
        the culprit finding as a note.
        """
        self._finish(ended=False, exception=exception)

    def __enter__(self) -> GradTraceCallback:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(exc)

    def _finish(self, *, ended: bool, exception: BaseException | None = None) -> None:
        trace = self.trace
        if trace is None or not trace.active:
            return
        atexit.unregister(self._close_at_exit)
        if ended:
            trace.stop()
        elif exception is not None:
            trace.stop(exception=exception)
        else:
            trace.stop(status=FAILED, exit_code=None)

    def _close_at_exit(self) -> None:
        # An uncaught exception is in sys.last_value by the time atexit handlers run.
        self.close(getattr(sys, "last_value", None))


__all__ = ["GradTraceCallback"]
