"""What a traced run writes besides its store, wired into a session by every front end.

Live TensorBoard events are a sink: they get each record as the run writer does. trace.json
and the findings count (which spares `gradtrace ls` reading a closed run's series back) are
made after close, from the report the session builds once. The session knows none of them:
it collects, and renders nothing.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
from pathlib import Path

from gradtrace.analysis.report import Report
from gradtrace.errors import GradtraceError
from gradtrace.reporters.chrome_trace import TRACE_FILE, write_trace
from gradtrace.reporters.tensorboard import LiveTensorBoard, require_tensorboard, tensorboard_dir
from gradtrace.session import Session
from gradtrace.store.format import FINDINGS_AT_CLOSE
from gradtrace.store.writer import add_meta


def attach_outputs(session: Session, *, tensorboard: bool | str | Path = False) -> None:
    """Before `session` starts: live TensorBoard events when asked (True: into
    RUN_DIR/tensorboard; a path: into that logdir), and after close trace.json and the
    findings count.

    Without the tensorboard package, asking for events raises GradtraceError here, before
    the run directory exists.
    """
    live = None
    if tensorboard is not False:
        require_tensorboard()
        live = LiveTensorBoard(_tensorboard_dir(session, tensorboard))
        session.add_sink(live.open)
    session.after_close(lambda report: _write_trace_file(session.run_dir, report))
    session.after_close(lambda report: _store_findings_count(session.run_dir, report))
    if live is not None:
        session.after_close(lambda report: live.finish(report, step=session.step))


def _tensorboard_dir(session: Session, tensorboard: bool | str | Path) -> Path:
    """Where live events go; in a user's logdir, a job's ranks sit side by side."""
    logdir = None if tensorboard is True else Path(tensorboard)
    if logdir is None or session.rank is None:
        return tensorboard_dir(session.run_dir, logdir)
    return tensorboard_dir(session.job_dir, logdir) / session.run_dir.name


def _write_trace_file(run_dir: Path, report: Report) -> None:
    """trace.json; on a full disk, say what is missing and go on (NOTE [store failure] in
    store/writer.py)."""
    trace = run_dir / TRACE_FILE
    try:
        write_trace(report, trace)
    except GradtraceError as error:
        with contextlib.suppress(OSError):
            trace.unlink(missing_ok=True)  # a cut-off file no viewer opens
        sys.stderr.flush()
        print(
            f"gradtrace: {error} The run itself is kept: 'gradtrace trace {run_dir}' writes it.",
            file=sys.stderr,
            flush=True,
        )


def _store_findings_count(run_dir: Path, report: Report) -> None:
    # The count only spares `ls` reading the series back: a run without it is whole.
    with contextlib.suppress(sqlite3.DatabaseError):
        add_meta(run_dir, **{FINDINGS_AT_CLOSE: len(report.findings)})
