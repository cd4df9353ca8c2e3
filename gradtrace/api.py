"""The Python API: trace code the user controls, as a context manager, decorator or start/stop.

Every front end (this one, the Lightning and Hugging Face callbacks) drives the same
`Session` and writes the same run directory as `gradtrace run`, so every report reads it.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, overload

import torch
from rich.console import Console
from torch import nn

from gradtrace.analysis.culprits import explain
from gradtrace.errors import GradtraceError
from gradtrace.events import Finding
from gradtrace.probes.timeline import TraceSteps
from gradtrace.reporters.terminal import TerminalReporter
from gradtrace.session import LEVELS, Session, default_run_dir, describe_exception
from gradtrace.store.format import FAILED, INTERRUPTED, OK
from gradtrace.store.reader import Run, StoredFinding, load_run

if TYPE_CHECKING:
    from typing_extensions import Unpack

# An exception is annotated with at most this many findings; the run directory has them all.
MAX_NOTES = 3

F = TypeVar("F", bound=Callable[..., Any])


class TraceOptions(TypedDict, total=False):
    """What a trace records, as `trace()` documents it; a missing one takes Session's default."""

    level: str
    every: int
    update_ratio: bool
    grad_histograms: int
    trace_steps: str | Iterable[int] | TraceSteps
    tensorboard: bool | str | Path
    check_ranks: bool


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
        **options: Unpack[TraceOptions],
    ) -> None:
        unknown = options.keys() - TraceOptions.__optional_keys__
        if unknown:
            raise TypeError(f"Unknown trace option(s): {', '.join(sorted(unknown))}.")
        if "trace_steps" in options:
            # Parsed now: a bad spec fails where it is written, not when tracing starts.
            options["trace_steps"] = TraceSteps.parse(options["trace_steps"])
        self.model = model
        self.out = None if out is None else Path(out)
        self.options = options
        self.name = name or _default_name(model)
        self.front_end = front_end
        self._session: Session | None = None
        self._closed = False

    @property
    def run_dir(self) -> Path | None:
        """The run directory, once tracing has started."""
        return None if self._session is None else self._session.run_dir

    @property
    def findings(self) -> list[Finding]:
        """Findings so far: the same objects the JSON report holds."""
        return [] if self._session is None else list(self._session.findings)

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
            run_dir, model=self.model, argv=sys.argv[:], front_end=self.front_end, **self.options
        )
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
                self.model, out=self.out, name=name, front_end=self.front_end, **self.options
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
    **options: Unpack[TraceOptions],
) -> Trace: ...
def trace(
    model: nn.Module | Callable[..., Any] | None = None,
    *,
    out: str | Path | None = None,
    **options: Unpack[TraceOptions],
) -> Any:
    """Trace a block (`with gradtrace.trace(model) as tr:`) or a function (`@gradtrace.trace`).

    `model` is optional: it names module paths from your root module (otherwise each
    top-level module called is a root). Options (all keyword, see `TraceOptions`):

    - `level`: "full" (default; names the writing line) or "light".
    - `every`: record gradient statistics every N optimizer steps (default 1).
    - `update_ratio`: also record ‖Δp‖/‖p‖ per parameter, at the cost of a device copy of
      the stepped parameters during each recorded `optimizer.step()` (default False).
    - `grad_histograms`: count every gradient's values into fixed bins every N optimizer
      steps (default 0: never).
    - `trace_steps`: the optimizer steps whose module spans and writes go into `trace.json`
      ("0-2,10", "none", or step indices; default the first three).
    - `tensorboard`: write TensorBoard events live: True into the run directory, a path into
      that logdir (under a `gradtrace` sub-run).
    - `check_ranks`: compare every parameter's norms across ranks at each recorded step.

    Under torchrun each rank records into `out/rank-N`. Only one trace may run at a time;
    starting a second raises GradtraceError.
    """
    if model is not None and not isinstance(model, nn.Module) and inspect.isroutine(model):
        return Trace(out=out, **options)(model)  # bare @gradtrace.trace
    return Trace(model, out=out, **options)  # type: ignore[arg-type]


def start(
    model: nn.Module | None = None,
    *,
    out: str | Path | None = None,
    **options: Unpack[TraceOptions],
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


def print_summary(
    run_dir: Path, run: Run | None = None, findings: list[StoredFinding] | None = None
) -> None:
    """Print the run's terminal summary to stderr; never raise into the training loop.

    `run` and `findings`: the run already read back and analysed (see
    `Session.after_close`), else they are read and derived here.
    It runs inside the framework's exception handler too, where raising would replace the
    user's exception with ours.
    """
    sys.stdout.flush()
    console = Console(stderr=True)
    try:
        TerminalReporter(console).render(load_run(run_dir) if run is None else run, findings)
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
        if level not in LEVELS:
            raise GradtraceError(f"Unknown level '{level}'; choose one of {', '.join(LEVELS)}.")
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
