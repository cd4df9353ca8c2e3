"""Write a run directory incrementally, committing after every step.

Rows a step produces (its gradient statistics, scalars, histograms, timeline) join one
transaction that `write_step` commits as the step ends: one commit per step. Metadata and
new findings commit at once, with whatever the step has written so far; a repeat of a
known finding only bumps its count, in the step's transaction (a SIGKILL loses the repeats
counted since the last committed step).

NOTE [store failure]: a store that cannot write (disk full, I/O error) stops recording; it
never fails the user's training. The step being written is rolled back (every committed
step stays), each later write is dropped, and the reason goes to `on_stop` (the session
says it once on stderr) and into the run's meta. A full disk leaves no room for that last
word, so the writer keeps RESERVE_BYTES in a file beside the database and frees them first.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from gradtrace.errors import GradtraceError
from gradtrace.events import (
    Finding,
    GradHistogram,
    ProbeFailure,
    RankNorms,
    Span,
    StepGradStats,
    TracedWrite,
)
from gradtrace.store.format import (
    DATABASE,
    DEAD_UNITS,
    FINDING_REPEATED,
    FINDINGS,
    FORMAT_VERSION,
    GRAD_CLIPS,
    GRAD_HISTOGRAMS,
    GRAPH_CUTS,
    META,
    MISSING_GRADS,
    MODULE_SITES,
    NONFINITE_OUTPUTS,
    OUTPUT_GRADS,
    PARAM_STATS,
    PROBE_FAILURES,
    RANK_NORMS,
    SCALARS,
    SCHEMA,
    SPANS,
    STEPS,
    THREADS,
    TRACED_WRITES,
    WRITE_COUNTS,
)

# Room freed when the store fails, for the meta that says so (a few SQLite pages each write).
RESERVE = ".gradtrace-reserve"
RESERVE_BYTES = 64 * 1024

_T = TypeVar("_T")


def _stops_on_failure(default: Any) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Run a write under the writer's lock; once the store has failed, skip it (NOTE [store
    failure]) and return `default`."""

    def decorate(method: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(method)
        def guarded(self: RunWriter, *args: Any, **kwargs: Any) -> _T:
            with self._lock:
                if self.stopped is not None:
                    return default
                try:
                    return method(self, *args, **kwargs)
                except sqlite3.DatabaseError as error:
                    self._stop(error)
                    return default

        return guarded

    return decorate


class RunWriter:
    """Owns the run database. Safe to call from autograd's backward threads.

    Findings are deduplicated on (kind, write line, op, saved line): a silent overwrite
    inside a training loop is one finding seen N times, not N findings.
    """

    def __init__(self, run_dir: Path, *, on_stop: Callable[[str], None] | None = None) -> None:
        """`on_stop` is told, once, why recording stopped (NOTE [store failure])."""
        self.run_dir = run_dir
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise GradtraceError(
                f"'{run_dir}' already exists; gradtrace never overwrites a run. "
                "Choose another --out."
            ) from None
        except OSError as error:
            message = f"Cannot create run directory '{run_dir}': {error.strerror}."
            raise GradtraceError(message) from None
        self._db = sqlite3.connect(
            run_dir / DATABASE, check_same_thread=False, isolation_level=None
        )
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as error:
            # Before the script runs (a disk already full): refuse, as for any --out.
            self._db.close()
            message = f"Cannot create the run store in '{run_dir}': {error}."
            raise GradtraceError(message) from None
        self._lock = threading.Lock()
        self._finding_ids: dict[tuple[object, ...], int] = {}
        # Why recording stopped (NOTE [store failure]); None while it records.
        self.stopped: str | None = None
        self._on_stop = on_stop
        self._last_step: int | None = None
        self._reserve = run_dir / RESERVE
        _reserve_space(self._reserve)
        self.set_meta(format=FORMAT_VERSION)

    def set_meta(self, **values: Any) -> None:
        """Commit metadata now. Tried even once recording has stopped: it is how the run
        says so (a failure then is ignored, the reader shows the run as killed)."""
        with self._lock:
            if self.stopped is not None:
                self._try_set_meta(values)
                return
            try:
                self._insert(SET_META, _meta_rows(values))
                self._commit()
            except sqlite3.DatabaseError as error:
                self._stop(error)
                self._try_set_meta(values)

    def _stop(self, error: sqlite3.DatabaseError) -> None:
        """Stop recording for good, keeping every committed step; lock held."""
        self._rollback()
        _free(self._reserve)
        kept = "no step" if self._last_step is None else f"steps up to {self._last_step}"
        self.stopped = (
            f"Recording stopped: the run store failed ({error}) at '{self.run_dir}'. "
            f"The run keeps {kept} and the findings stored before; training went on."
        )
        self._try_set_meta({"recording_stopped": self.stopped, "notices": [self.stopped]})
        if self._on_stop is not None:
            self._on_stop(self.stopped)

    def _try_set_meta(self, values: dict[str, Any]) -> None:
        try:
            self._insert(SET_META, _meta_rows(values))
            self._commit()
        except sqlite3.DatabaseError:
            self._rollback()

    def _rollback(self) -> None:
        # A failed COMMIT may have rolled back already: a second ROLLBACK then fails.
        with contextlib.suppress(sqlite3.DatabaseError):
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")

    def _insert(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """`executemany`, skipped for no rows: most of a step's tables get none, and each
        empty call still costs a statement lookup on the store thread."""
        if rows:
            self._db.executemany(sql, rows)

    def _begin(self) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN")

    def _commit(self) -> None:
        if self._db.in_transaction:
            self._db.execute("COMMIT")

    @_stops_on_failure(None)
    def write_step(
        self,
        step: int,
        counts: Iterable[tuple[tuple[str, str, str], int]],
        *,
        finished: bool,
    ) -> None:
        """Commit a step's write counts with its other rows; `finished` marks the step done."""
        rows = [(step, owner, op, phase, count) for (owner, op, phase), count in counts]
        self._begin()
        self._insert(WRITE_COUNTS.insert, rows)
        if finished:
            self._db.execute(STEPS.insert, (step, time.time_ns()))
        self._commit()
        if finished:
            self._last_step = step

    @_stops_on_failure(None)
    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        self._begin()
        self._insert(SCALARS.insert, [(step, name, value) for name, value in values.items()])

    @_stops_on_failure(None)
    def write_grad_stats(self, stats: StepGradStats) -> None:
        """Store one optimizer's recorded step; committed with the step's other rows."""
        self._begin()
        step, optimizer = stats.step, stats.optimizer
        self._insert(PARAM_STATS.insert, PARAM_STATS.rows(stats.params, step, optimizer))
        self._insert(
            MISSING_GRADS.insert,
            [(step, optimizer, param, module) for param, module in stats.missing],
        )
        self._insert(
            NONFINITE_OUTPUTS.insert,
            [(step, i, module) for i, module in enumerate(stats.nonfinite_outputs)],
        )
        self._insert(
            OUTPUT_GRADS.insert,
            [(step, optimizer, module, norm) for module, norm in stats.output_grad_norms],
        )
        self._insert(GRAD_CLIPS.insert, GRAD_CLIPS.rows(stats.clips, step, optimizer))
        self._insert(DEAD_UNITS.insert, [(step, optimizer, *counts) for counts in stats.dead_units])
        self._insert(GRAPH_CUTS.insert, [(step, module) for module in stats.cut])
        self._insert(
            MODULE_SITES.insert,
            [
                (module, json.dumps(asdict(source)) if source else None)
                for module, source in stats.new_sites
            ],
        )

    @_stops_on_failure(None)
    def write_histograms(self, histograms: list[GradHistogram]) -> None:
        self._begin()
        self._insert(GRAD_HISTOGRAMS.insert, GRAD_HISTOGRAMS.rows(histograms))

    @_stops_on_failure(None)
    def write_rank_norms(self, norms: RankNorms) -> None:
        rows = [
            (norms.step, norms.optimizer, param, rank, grads[i], params[i])
            for rank, (grads, params) in enumerate(
                zip(norms.grad_norms, norms.param_norms, strict=True)
            )
            for i, param in enumerate(norms.params)
        ]
        self._begin()
        self._insert(RANK_NORMS.insert, rows)

    @_stops_on_failure(None)
    def write_timeline(
        self, spans: Iterable[Span], writes: Iterable[TracedWrite], threads: dict[int, str]
    ) -> None:
        """Store a traced step's spans and writes, and names of threads first seen."""
        self._begin()
        self._insert(SPANS.insert, SPANS.rows(spans))
        self._insert(TRACED_WRITES.insert, TRACED_WRITES.rows(writes, extra=_source_row))
        self._insert(THREADS.insert, list(threads.items()))

    @_stops_on_failure(None)
    def add_probe_failure(self, failure: ProbeFailure) -> None:
        """Store a probe's failure at once: a run killed later still tells it."""
        self._insert(PROBE_FAILURES.insert, PROBE_FAILURES.rows([failure]))
        self._commit()

    @_stops_on_failure(False)
    def add_finding(self, finding: Finding) -> bool:
        """Store a finding; return False if it repeats one already stored."""
        key = finding.same_bug
        known = self._finding_ids.get(key)
        if known is not None:
            self._begin()
            self._db.execute(FINDING_REPEATED, (known,))
            return False
        cursor = self._db.execute(
            FINDINGS.insert, (finding.kind, finding.step, 1, json.dumps(finding.to_dict()))
        )
        self._commit()
        self._finding_ids[key] = cursor.lastrowid
        return True

    def close(self) -> None:
        with self._lock:
            try:
                self._commit()
            except sqlite3.DatabaseError as error:
                self._stop(error)
            self._db.close()
            _free(self._reserve)


def _reserve_space(path: Path) -> None:
    """Hold RESERVE_BYTES on the run's disk (random bytes: a compressing filesystem keeps
    them). A disk too full for them now is left alone: the store then fails a little sooner."""
    try:
        path.write_bytes(os.urandom(RESERVE_BYTES))
    except OSError:
        _free(path)


def _free(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def add_meta(run_dir: Path, **values: Any) -> None:
    """Set metadata of a run whose writer has closed: facts known only once it is read back."""
    db = sqlite3.connect(run_dir / DATABASE, isolation_level=None)
    try:
        db.executemany(SET_META, _meta_rows(values))
    finally:
        db.close()


SET_META = META.insert


def _meta_rows(values: dict[str, Any]) -> list[tuple[str, str]]:
    return [(key, json.dumps(value)) for key, value in values.items()]


def _source_row(write: TracedWrite) -> tuple[object, ...]:
    """A traced write's SOURCE_COLUMNS: its first user frame, without context lines."""
    source = write.source
    if source is None:
        return (None,) * 4
    return (source.file, source.line, source.function, source.code)
