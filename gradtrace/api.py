"""The Python API: trace code the user controls, as a context manager, decorator or start/stop.

Every front end (this one, the Lightning and Hugging Face callbacks) drives the same
`Session` and writes the same run directory as `gradtrace run`, so every report reads it.
"""

from __future__ import annotations

import functools
import inspect
import sys
import textwrap
from collections.abc import Callable
from html import escape
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, overload

import torch
from rich.console import Console
from torch import nn

from gradtrace.analysis.culprits import explain
from gradtrace.analysis.grad_health import module_norms
from gradtrace.analysis.report import Report, build_report
from gradtrace.errors import GradtraceError
from gradtrace.events import Finding
from gradtrace.options import RunOptions
from gradtrace.outputs import attach_outputs
from gradtrace.reporters.notebook import Findings, run_html
from gradtrace.reporters.terminal import TerminalReporter
from gradtrace.session import Session, default_run_dir, describe_exception
from gradtrace.store.format import FAILED, INTERRUPTED, OK
from gradtrace.store.reader import Run, load_run

# An exception is annotated with at most this many findings; the run directory has them all.
MAX_NOTES = 3

F = TypeVar("F", bound=Callable[..., Any])


class Trace:
    """One traced run: use it as a context manager, a decorator, or `start()` / `stop()`.

    The run directory is `out`, or `./gradtrace-runs/<time>-<name>` when `out` is None
    (chosen when tracing starts, so each call of a decorated function gets its own). A trace
    runs once; an exception raised inside it propagates unchanged in type, with the
    finding that explains it added as a note when its message does not already say so.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        out: str | Path | None = None,
        name: str | None = None,
        front_end: str = "trace",
        argv: list[str] | None = None,
        options: RunOptions | None = None,
        **values: Any,
    ) -> None:
        # Checked now: a bad option fails where it is written, not when tracing starts.
        self.options = RunOptions.of(options, **values)
        self.model = model
        self.out = None if out is None else Path(out)
        self.name = name or _default_name(model)
        self.front_end = front_end
        # What the run says was run (reports' headers, `ls`): the process's argv by default.
        self.argv = argv
        self._session: Session | None = None
        self._closed = False
        self._run: Run | None = None

    @property
    def run_dir(self) -> Path | None:
        """The run directory, once tracing has started."""
        return None if self._session is None else self._session.run_dir

    @property
    def findings(self) -> list[Finding]:
        """Findings so far: the same objects the JSON report holds (a list that a notebook
        shows as finding cards). Gradient findings come once the trace has stopped."""
        return Findings([] if self._session is None else self._session.findings)

    @property
    def grad_norms(self) -> dict[str, list[tuple[int, float]]]:
        """Gradient L2 norm per module, `{path: [(step, norm), ...]}`, once the trace stopped.

        For tests of gradient health (`gradtrace` pytest fixture): read from the run
        directory, so it holds what every report shows.
        """
        return module_norms(self._stored_run().grad_steps).grad

    def _stored_run(self) -> Run:
        """The run as stored, read once after the trace stopped."""
        if not self._closed:
            raise GradtraceError("Stop the trace first: its run is read back once it stopped.")
        if self._run is None:
            assert self._session is not None
            self._run = load_run(self._session.run_dir)
        return self._run

    def _repr_html_(self) -> str:
        """In a notebook: the HTML report once stopped, else where the trace records."""
        if not self._closed:
            return f"<p>{escape(repr(self))}</p>"
        try:
            return run_html(self._stored_run())
        except GradtraceError as error:
            return f"<p>gradtrace: {escape(str(error))}</p>"

    @property
    def step(self) -> int:
        """Index of the optimizer step in progress (0 before the first `optimizer.step()`)."""
        return 0 if self._session is None else self._session.step

    @property
    def active(self) -> bool:
        return self._session is not None and not self._closed

    def start(self) -> Trace:
        """Install the probes and create the run directory. Returns self."""
        if self._session is not None:
            where = self._session.run_dir
            raise GradtraceError(
                f"This trace already ran into '{where}'; a trace runs once. "
                "Create a new one with gradtrace.trace() or gradtrace.start()."
            )
        run_dir = self.out if self.out is not None else default_run_dir(self.name)
        session = Session(
            run_dir,
            self.options,
            model=self.model,
            argv=sys.argv[:] if self.argv is None else self.argv,
            front_end=self.front_end,
        )
        attach_outputs(session, tensorboard=self.options.tensorboard)
        session.start()
        self._session = session
        return self

    def stop(
        self,
        *,
        status: str = OK,
        exit_code: int | None = 0,
        exception: BaseException | None = None,
    ) -> None:
        """Remove every probe and finish the run record. Safe to call twice.

        With `exception`, the run is recorded as failed (interrupted for Ctrl-C) and the
        exception gets the culprit finding as a note.
        """
        session = self._session
        if session is None or self._closed:
            return
        self._closed = True
        if exception is None:
            session.close(status=status, exit_code=exit_code)
            return
        failed = INTERRUPTED if isinstance(exception, KeyboardInterrupt) else FAILED
        try:
            session.record_error(exception)
            session.close(status=failed, exit_code=None, exception=describe_exception(exception))
        except Exception as error:
            # Raising here would replace the user's exception with ours: say it and go on.
            print(
                f"gradtrace: could not finish the run record in '{session.run_dir}' ({error!r}).",
                file=sys.stderr,
            )
        annotate(exception, session.findings)

    def log(self, **values: float | torch.Tensor) -> None:
        """Record scalars (e.g. `loss=loss`) for the current step; tensors are read a step late."""
        if not self.active:
            raise GradtraceError("This trace is not running; log() only works while it traces.")
        assert self._session is not None
        self._session.log(**values)

    def summarize_at_stop(self) -> None:
        """Print the terminal summary as the trace stops, from the read `stop` makes anyway."""
        if self._session is None:
            raise GradtraceError("Start the trace before asking for its summary.")
        self._session.after_close(functools.partial(print_summary, self._session.run_dir))

    def __enter__(self) -> Trace:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(exception=exc)

    def __call__(self, func: F) -> F:
        """Decorate `func`: every call runs under a new trace with these options.

        The latest call's trace is `func.gradtrace` (its `findings`, `run_dir`).
        """
        if self._session is not None:
            raise GradtraceError("A trace that already started cannot decorate a function.")
        name = self.name if self.model is not None else func.__name__

        @functools.wraps(func)
        def traced(*args: Any, **kwargs: Any) -> Any:
            run = Trace(
                self.model,
                out=self.out,
                name=name,
                front_end=self.front_end,
                options=self.options,
            )
            traced.gradtrace = run  # type: ignore[attr-defined]
            with run:
                return func(*args, **kwargs)

        traced.gradtrace = None  # type: ignore[attr-defined]
        return traced  # type: ignore[return-value]

    def __repr__(self) -> str:
        state = "running" if self.active else ("done" if self._closed else "not started")
        return f"<gradtrace.Trace {state} run_dir={str(self.run_dir)!r}>"


@overload
def trace(model: F) -> F: ...
@overload
def trace(
    model: nn.Module | None = None,
    *,
    out: str | Path | None = None,
    **options: Any,
) -> Trace: ...
def trace(
    model: nn.Module | Callable[..., Any] | None = None,
    *,
    out: str | Path | None = None,
    **options: Any,
) -> Any:
    """Trace a block (`with gradtrace.trace(model) as tr:`) or a function (`@gradtrace.trace`).

    `model` is optional: it names module paths from your root module (otherwise each
    top-level module called is a root). The options, all keyword, are the fields of
    `gradtrace.options.RunOptions`, the same as `gradtrace run`'s; a misspelt one is a
    TypeError. A whole `RunOptions` can be given as `options=`.

    {options}

    Under torchrun each rank records into `out/rank-N`. Only one trace may run at a time;
    starting a second raises GradtraceError.
    """
    if model is not None and not isinstance(model, nn.Module) and inspect.isroutine(model):
        return Trace(out=out, **options)(model)  # bare @gradtrace.trace
    return Trace(model, out=out, **options)  # type: ignore[arg-type]


# The options' list, from their one declaration.
trace.__doc__ = (trace.__doc__ or "").replace(
    "    {options}", textwrap.indent(RunOptions.describe(), "    ")
)


def start(
    model: nn.Module | None = None,
    *,
    out: str | Path | None = None,
    **options: Any,
) -> Trace:
    """Start tracing now; call `.stop()` on the result to finish the run (options as trace)."""
    return Trace(model, out=out, **options).start()


def annotate(exception: BaseException, findings: list[Finding]) -> None:
    """Add each finding the exception's message does not already explain as a note."""
    add_note = getattr(exception, "add_note", None)  # Python >= 3.11
    if add_note is None:
        return
    said = "\n".join([str(exception), *getattr(exception, "__notes__", ())])
    for finding in findings[:MAX_NOTES]:
        if f"gradtrace: {finding.message}" not in said:
            add_note(explain(finding))


def print_summary(run_dir: Path, report: Report | None = None) -> None:
    """Print the run's terminal summary to stderr; never raise into the training loop.

    `report`: the run already read back and analysed (see `Session.after_close`), else it is
    read and analysed here. It runs inside the framework's exception handler too, where
    raising would replace the user's exception with ours.
    """
    sys.stdout.flush()
    console = Console(stderr=True)
    try:
        TerminalReporter(console).render(
            build_report(load_run(run_dir)) if report is None else report
        )
    except Exception as error:
        # Ours are one-line messages already; anything else is named as it is.
        known = isinstance(error, GradtraceError)
        why = str(error) if known else f"could not render the summary ({error!r})."
        console.print(f"gradtrace: {why}", markup=False)
        console.print(f"run directory: {run_dir}", markup=False)


def _default_name(model: nn.Module | None) -> str:
    if model is not None:
        return type(model).__name__
    script = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else ""
    return script or "trace"


class CallbackTrace:
    """What the framework callbacks share: their options and the trace of the latest run."""

    out: Path | None
    level: str
    summary: bool
    trace: Trace | None

    def _set_options(self, out: str | Path | None, level: str, summary: bool) -> None:
        RunOptions(level=level)  # a bad level fails as the callback is made, not in training
        self.out = None if out is None else Path(out)
        self.level = level
        self.summary = summary
        self.trace = None

    def _begin(self, trace: Trace) -> None:
        """Start tracing; with `summary`, the summary prints as the trace stops."""
        trace.start()
        if self.summary:
            trace.summarize_at_stop()
        self.trace = trace

    @property
    def run_dir(self) -> Path | None:
        """The latest run's directory (None before training starts)."""
        return None if self.trace is None else self.trace.run_dir

    @property
    def findings(self) -> list[Finding]:
        return [] if self.trace is None else self.trace.findings
