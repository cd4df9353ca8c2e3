"""`gradtrace ls`: one row per run directory, read from each run's store."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

from gradtrace.analysis.report import build_report
from gradtrace.errors import GradtraceError
from gradtrace.store.format import (
    DATABASE,
    FAILED,
    FINDINGS_AT_CLOSE,
    INTERRUPTED,
    KILLED,
    OK,
    rank_run_dirs,
)
from gradtrace.store.reader import RunFacts, load_facts, load_job_facts, load_run

STATUS_STYLES = {OK: "green", FAILED: "red", INTERRUPTED: "yellow", KILLED: "red"}


@dataclass(frozen=True)
class RunEntry:
    """A run directory as `ls` shows it: a few facts of its run, or why it could not be read.

    Only the facts are kept, not the run: a directory of long runs must not hold every
    run's series in memory at once.
    """

    path: Path
    facts: RunFacts | None = None
    findings: int = 0
    error: str | None = None

    @property
    def started_ns(self) -> int:
        started = self.facts.meta.get("started_ns") if self.facts is not None else None
        return started if isinstance(started, int) else 0


def find_runs(directory: Path) -> list[RunEntry]:
    """Every run directory directly inside `directory`, oldest first.

    A torchrun job's directory is one run. Directories without a run database are skipped;
    a run database, or a directory, that cannot be read is listed with the reason: one bad
    entry never hides the others.
    """
    if not directory.is_dir():
        raise GradtraceError(
            f"No directory '{directory}'. Give the directory holding your runs "
            "(default ./gradtrace-runs)."
        )
    try:
        children = sorted(directory.iterdir())
    except OSError as error:
        raise GradtraceError(f"Cannot list '{directory}': {error.strerror}.") from None
    entries = []
    for child in children:
        try:
            if not (child / DATABASE).is_file() and not rank_run_dirs(child):
                continue
            entries.append(_entry(child))
        except GradtraceError as error:
            entries.append(RunEntry(child, error=str(error)))
        except OSError as error:
            entries.append(RunEntry(child, error=f"Cannot read '{child}': {error.strerror}."))
    return sorted(entries, key=lambda entry: entry.started_ns)


def _entry(path: Path) -> RunEntry:
    """A closed run's facts alone (its findings were counted at close), a torchrun job's
    from its ranks' facts (each rank counted its own); any other run (killed, or a job with
    a rank that did not close) is read whole to count what its series show."""
    facts = load_facts(path)
    if facts is None:
        facts, count = load_job_facts(path)
    else:
        count = facts.meta.get(FINDINGS_AT_CLOSE)
    if not isinstance(count, int):
        run = load_run(path)
        facts, count = RunFacts(path, run.meta, run.steps), len(build_report(run).findings)
    return RunEntry(path, facts, count)


def render_runs_table(entries: list[RunEntry], directory: Path) -> Table:
    """One row per run. On a narrow console (80 columns: a pipe, CI logs) the short columns
    keep their width and the run name, start time and command wrap: nothing that tells the
    runs apart is cut off. Names, commands and errors are `Text`, never markup (print the
    table through `Plain` to keep their control characters off the terminal)."""
    rows = [_row(entry) for entry in entries]
    table = Table(title=Text(f"gradtrace runs in {directory}"), title_justify="left")
    table.add_column("run", style="cyan", overflow="fold")
    for index, (header, justify) in enumerate(
        [("status", "left"), ("steps", "right"), ("findings", "right")], start=1
    ):
        # A fixed width as wide as the column's text: rich never narrows fixed columns.
        width = max(cell_len(header), *(row[index].cell_len for row in rows))
        table.add_column(header, justify=justify, width=width, no_wrap=True)
    table.add_column("started")  # wraps between date and time
    table.add_column("command", overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _row(entry: RunEntry) -> tuple[Text, ...]:
    name = Text(entry.path.name)
    facts = entry.facts
    if facts is None:
        blank = (Text(), Text(), Text())
        return (name, Text("unreadable", style="red"), *blank, Text(entry.error or ""))
    exit_code = facts.meta.get("exit_code")
    status = facts.status if exit_code in (None, 0) else f"{facts.status} ({exit_code})"
    return (
        name,
        Text(status, style=STATUS_STYLES.get(facts.status, "")),
        Text(str(facts.steps)),
        Text(str(entry.findings), style="bold red" if entry.findings else "green"),
        Text(_started(entry.started_ns)),
        Text(" ".join(facts.meta.get("argv") or [])),
    )


def _started(started_ns: int) -> str:
    if not started_ns:
        return "?"
    return datetime.fromtimestamp(started_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
