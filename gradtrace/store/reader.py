"""Read a run directory back, refusing anything that is not a gradtrace run we understand."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gradtrace.errors import GradtraceError
from gradtrace.events import (
    HISTOGRAM_EDGES,
    ClipCall,
    Finding,
    GradHistogram,
    ParamStat,
    ProbeFailure,
    RankNorms,
    SourceLine,
    Span,
    StepGradStats,
    TracedWrite,
)
from gradtrace.store.format import (
    DATABASE,
    DEAD_UNITS,
    FINDINGS,
    FINDINGS_AT_CLOSE,
    FORMAT_VERSION,
    GRAD_CLIPS,
    GRAD_HISTOGRAMS,
    GRAPH_CUTS,
    KILLED,
    MISSING_GRADS,
    MODULE_SITES,
    NONFINITE_OUTPUTS,
    OK,
    OUTPUT_GRADS,
    PARAM_STATS,
    PROBE_FAILURES,
    RANK_NORMS,
    REAL,
    RUNNING,
    SCALARS,
    SPANS,
    STEPS,
    TABLES,
    TEXT,
    THREADS,
    TRACED_WRITES,
    WRITE_TOTALS,
    WRITES_PER_STEP,
    Table,
    rank_run_dirs,
)
from gradtrace.store.format import META as META_TABLE
from gradtrace.store.migrations import pending
from gradtrace.store.shards import combine_shards

T = TypeVar("T")

# Bounds on what is read: a run directory comes from anyone, and a hostile or damaged one must
# not make a report take minutes. No run gradtrace writes comes near them.
# Characters in one stored string: longer names and lines of code refuse the run; longer
# messages (an exception's text, read from JSON) are cut.
MAX_TEXT = 65_536
# Items of one stored list (argv, a finding's context lines, its other writes, notices); more
# are cut.
MAX_ITEMS = 1_000
# Nesting of stored JSON (a finding's details, unknown meta keys).
MAX_DEPTH = 8


@dataclass(frozen=True)
class StoredFinding:
    finding: Finding
    count: int


@dataclass(frozen=True)
class Run:
    """Everything a report needs, read from the store alone."""

    path: Path
    meta: dict[str, Any]
    findings: list[StoredFinding]
    steps: int
    # (owner, op, phase) -> in-place writes over the whole run, most frequent first.
    write_counts: list[tuple[str, str, str, int]] = field(default_factory=list)
    # name -> [(step, value), ...] in step order.
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    # Recorded optimizer steps in step order (nonfinite/cut/missing filled, new_sites empty).
    grad_steps: list[StepGradStats] = field(default_factory=list)
    # Module path -> where it is called from.
    module_sites: dict[str, SourceLine | None] = field(default_factory=dict)
    # (step, owner, op, phase, count): in-place writes per step, in step order.
    step_write_counts: list[tuple[int, str, str, str, int]] = field(default_factory=list)
    # Finished step -> wall clock (ns) when it ended, in step order.
    step_end_ns: dict[int, int] = field(default_factory=dict)
    # Gradient value histograms (--grad-histograms), in step order; bins in meta.
    grad_histograms: list[GradHistogram] = field(default_factory=list)
    # Every rank's per-parameter norms (--check-ranks), in step order; rank 0 keeps them.
    rank_norms: list[RankNorms] = field(default_factory=list)
    # The torchrun rank that wrote this run; None outside distributed runs.
    rank: int | None = None
    # A torchrun job's merged view: each rank's own run, by rank. Empty for one process.
    ranks: tuple[Run, ...] = ()
    # Traced steps (--trace-steps): module and optimizer spans, every write, thread names.
    # Empty for runs recorded before gradtrace kept them.
    spans: list[Span] = field(default_factory=list)
    traced_writes: list[TracedWrite] = field(default_factory=list)
    threads: dict[int, str] = field(default_factory=dict)
    # Probes that failed and switched themselves off, in the order they failed.
    probe_failures: list[ProbeFailure] = field(default_factory=list)

    @property
    def writes(self) -> int:
        return sum(row[3] for row in self.write_counts)

    @property
    def status(self) -> str:
        return run_status(self.meta)


@dataclass(frozen=True)
class RunFacts:
    """A run's metadata and finished-step count, read without its series."""

    path: Path
    meta: dict[str, Any]
    steps: int

    @property
    def status(self) -> str:
        return run_status(self.meta)


def run_status(meta: dict[str, Any]) -> str:
    """How the run ended; a run still marked running when read was killed (or still runs)."""
    status = meta.get("status", RUNNING)
    return KILLED if status == RUNNING else status


def load_run(path: str | Path) -> Run:
    """Open a run directory written by `gradtrace run` (or any gradtrace front end).

    A torchrun job's directory (one `rank-N` run per rank) opens as one merged run.
    """
    run_dir = _run_dir(path)
    if not (run_dir / DATABASE).is_file() and (ranks := rank_run_dirs(run_dir)):
        return merge_ranks(run_dir, [load_run(rank_dir) for _, rank_dir in ranks])
    return _open(run_dir, _read, TABLES)


def load_job(paths: Sequence[str | Path]) -> Run:
    """One run from one directory, or one torchrun job from several: each node's own job
    directory (or single rank runs) when the nodes share no filesystem.

    Every directory must hold ranks of one job: a rank found twice, or ranks that disagree
    on the job's size, is a one-line error.
    """
    if len(paths) == 1:
        return load_run(paths[0])
    by_rank: dict[int, Run] = {}
    for path in paths:
        for run in _rank_runs(_run_dir(path)):
            assert run.rank is not None
            if run.rank in by_rank:
                raise GradtraceError(
                    f"Rank {run.rank} is recorded twice ('{by_rank[run.rank].path}' and "
                    f"'{run.path}'); give each node's directory once."
                )
            by_rank[run.rank] = run
    sizes = {run.meta.get("world_size") for run in by_rank.values()}
    if len(sizes) > 1:
        raise GradtraceError(
            f"The directories hold ranks of different jobs (world sizes "
            f"{', '.join(sorted(map(str, sizes)))}); give the directories of one job."
        )
    return merge_ranks(Path(paths[0]), [by_rank[rank] for rank in sorted(by_rank)])


def _rank_runs(run_dir: Path) -> list[Run]:
    """The ranks a directory holds: a job directory's `rank-N` runs, or one rank's run."""
    if not (run_dir / DATABASE).is_file() and (ranks := rank_run_dirs(run_dir)):
        return [load_run(rank_dir) for _, rank_dir in ranks]
    run = load_run(run_dir)
    if run.rank is None:
        raise GradtraceError(
            f"'{run_dir}' is a run of one process, not part of a torchrun job; only a job's "
            "directories (one per node) are read together."
        )
    return [run]


# What `load_facts` reads: a run's metadata and its step count, not its series.
FACT_TABLES = (META_TABLE, STEPS)


def load_facts(path: str | Path) -> RunFacts | None:
    """A run's metadata and step count, checked as `load_run` checks them, in one query of
    each: for listing runs whose series would take seconds to read. None for a torchrun
    job's directory (it has no database of its own)."""
    run_dir = _run_dir(path)
    if not (run_dir / DATABASE).is_file() and rank_run_dirs(run_dir):
        return None
    return _open(run_dir, _read_facts, FACT_TABLES)


def _run_dir(path: str | Path) -> Path:
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise GradtraceError(f"No gradtrace run at '{run_dir}' (not a directory).")
    return run_dir


Read = Callable[[Path, sqlite3.Connection, dict[str, Any]], T]


def _open(run_dir: Path, read: Read[T], tables: tuple[Table, ...]) -> T:
    """`read` the run's `tables` (given the checked meta), read-only and brought to
    FORMAT_VERSION; anything unreadable is a one-line error."""
    database = run_dir / DATABASE
    if not database.is_file():
        raise GradtraceError(
            f"No gradtrace run at '{run_dir}' (no {DATABASE}). "
            "Use the directory printed by 'gradtrace run'."
        )
    try:
        return _read_without_writing(database, lambda db: _read_migrated(run_dir, db, read, tables))
    except (sqlite3.DatabaseError, ValueError, RecursionError, KeyError, TypeError) as error:
        why = _one_line(str(error) if isinstance(error, BrokenRun) else repr(error))
        raise GradtraceError(
            f"'{database}' is not a readable gradtrace run ({why}). "
            "It may be corrupt or written by another program."
        ) from None
    except OSError as error:
        # The run itself, or the private copy an older or killed run is read from (in
        # TMPDIR): unreadable, a full disk, a temporary directory that does not exist.
        where = f" ({error.filename})" if error.filename else ""
        raise GradtraceError(
            f"Could not read '{database}': {_one_line(error.strerror or str(error))}{where}. "
            "An older or killed run is read from a copy in TMPDIR, which must be writable."
        ) from None


def _read_without_writing(database: Path, read: Callable[[sqlite3.Connection], T]) -> T:
    """`read` the database opened read-only, where reading needs no write access either.

    SQLite in WAL mode (as the writer leaves it) needs to create `run.sqlite-shm` next to the
    database even to read, which fails on a read-only medium or in someone else's directory.
    Then a database without a pending WAL is opened immutable, and one with a pending WAL (a
    killed run) is read from a private copy, so its last committed steps are not lost.
    """
    uri = database.resolve().as_uri()
    try:
        return _query(f"{uri}?mode=ro", read)
    except sqlite3.OperationalError as error:
        if "unable to open" not in str(error) and "readonly" not in str(error):
            raise
    wal = database.with_name(database.name + "-wal")
    if not (wal.is_file() and wal.stat().st_size):
        return _query(f"{uri}?mode=ro&immutable=1", read)
    with tempfile.TemporaryDirectory(prefix="gradtrace-") as scratch:
        copy = Path(scratch) / DATABASE
        shutil.copyfile(database, copy)
        shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        return _query(f"{copy.as_uri()}?mode=ro", read)


def _read_migrated(
    run_dir: Path, db: sqlite3.Connection, read: Read[T], tables: tuple[Table, ...]
) -> T:
    """`read` the database as if written at FORMAT_VERSION: a run in an older format is
    copied into a private scratch directory and migrated there (`store/migrations.py`), when a
    migration changes any of the `tables` read."""
    meta = _read_meta(run_dir, db)
    migrations = pending(meta["format"])
    names = {table.name for table in tables}
    if not any(migration.tables & names for migration in migrations):
        return read(run_dir, db, meta)
    with tempfile.TemporaryDirectory(prefix="gradtrace-") as scratch:
        copy = sqlite3.connect(Path(scratch) / DATABASE, isolation_level=None)
        try:
            db.backup(copy)
            for migration in migrations:
                migration.apply(copy)
            return read(run_dir, copy, meta)
        finally:
            copy.close()


def _query(uri: str, read: Callable[[sqlite3.Connection], T]) -> T:
    db = sqlite3.connect(uri, uri=True)
    try:
        return read(db)
    finally:
        db.close()


def _one_line(text: str) -> str:
    """An error's detail for one line of the terminal: no control characters, short."""
    return _CONTROL.sub(" ", text)[:300]


def _read_facts(run_dir: Path, db: sqlite3.Connection, meta: dict[str, Any]) -> RunFacts:
    return RunFacts(run_dir, meta, _count_steps(db))


def _read_meta(run_dir: Path, db: sqlite3.Connection) -> dict[str, Any]:
    _check_column_types(db, (META_TABLE,))
    meta = {key: json.loads(value) for key, value in db.execute(META_TABLE.select)}
    version = meta.get("format")
    if not isinstance(version, int) or isinstance(version, bool):
        raise GradtraceError(f"'{run_dir}' has no gradtrace format version; not a gradtrace run.")
    if version < 1:
        raise BrokenRun(f"meta 'format' is {version}, a run format no gradtrace wrote")
    if version > FORMAT_VERSION:
        raise GradtraceError(
            f"'{run_dir}' was written in run format {version}; this gradtrace reads up to "
            f"{FORMAT_VERSION}. Upgrade gradtrace (pip install -U gradtrace)."
        )
    return {key: META.get(key, _any)(value, f"meta '{key}'") for key, value in meta.items()}


def _count_steps(db: sqlite3.Connection) -> int:
    (steps,) = db.execute(f"SELECT COUNT(*) FROM {STEPS.name}").fetchone()
    return steps


def _read(run_dir: Path, db: sqlite3.Connection, meta: dict[str, Any]) -> Run:
    _check_column_types(db, [table for table in TABLES if table is not META_TABLE])
    findings = [
        StoredFinding(_finding(json.loads(body), f"finding {id_}"), count)
        for id_, _, _, count, body in db.execute(FINDINGS.select)
    ]
    scalars: dict[str, list[tuple[int, float]]] = {}
    for step, name, value in db.execute(SCALARS.select):
        scalars.setdefault(name, []).append((step, _real(value)))
    return Run(
        path=run_dir,
        scalars=scalars,
        grad_steps=_read_grad_steps(db),
        module_sites={
            module: _source_line(json.loads(source), f"module_sites '{module}'") if source else None
            for module, source in db.execute(MODULE_SITES.select)
        },
        meta=meta,
        findings=findings,
        steps=_count_steps(db),
        write_counts=[tuple(row) for row in db.execute(WRITE_TOTALS)],
        step_write_counts=[tuple(row) for row in db.execute(WRITES_PER_STEP)],
        step_end_ns=dict(db.execute(STEPS.select)),
        rank_norms=_read_rank_norms(db),
        grad_histograms=_read_histograms(db),
        rank=meta.get("rank"),
        probe_failures=_read_probe_failures(db),
        **_read_timeline(db),
    )


def merge_ranks(job_dir: Path, runs: list[Run]) -> Run:
    """One run standing for a torchrun job: the first rank's series, every rank's findings.

    After DDP's all-reduce every rank holds the same gradients, so one rank's series speak
    for all (`--check-ranks` verifies it); findings and outcomes differ per rank and are all
    kept, each finding tagged with its rank. The job's status is that of the rank that
    failed first, since later failures are usually the others noticing it.
    """
    first = runs[0]
    meta = _job_meta([run.meta for run in runs])
    # FSDP2 / tensor parallel: each rank recorded its own shards; the job's series show whole
    # parameters.
    shards = {name: n for run in runs for name, n in (run.meta.get("param_shards") or {}).items()}
    grad_steps = combine_shards([run.grad_steps for run in runs], shards)
    findings = [
        StoredFinding(dataclasses.replace(stored.finding, rank=run.rank), stored.count)
        for run in runs
        for stored in run.findings
    ]
    failures = [
        dataclasses.replace(failure, rank=run.rank)
        for run in runs
        for failure in run.probe_failures
    ]
    return dataclasses.replace(
        first,
        path=job_dir,
        meta=meta,
        findings=findings,
        rank=None,
        ranks=tuple(runs),
        probe_failures=failures,
        grad_steps=grad_steps,
    )


def _job_meta(metas: list[dict[str, Any]]) -> dict[str, Any]:
    """A job's meta from its ranks' (in rank order): the first rank's, with the outcome of
    the rank that failed first."""
    failed = sorted(
        (meta for meta in metas if run_status(meta) != OK),
        key=lambda meta: (meta.get("ended_ns") is None, meta.get("ended_ns") or 0),
    )
    outcome = failed[0] if failed else metas[0]
    return {
        **metas[0],
        **{key: outcome.get(key) for key in ("status", "exit_code", "exception", "ended_ns")},
        "world_size": metas[0].get("world_size", len(metas)),
        "first_failed_rank": failed[0].get("rank") if failed else None,
    }


def load_job_facts(path: str | Path) -> tuple[RunFacts, int | None]:
    """A torchrun job's facts, as `merge_ranks` would give them, read from its ranks' facts
    alone (no series), and its findings count when every rank stored one at close (the job's
    findings are its ranks' together), else None."""
    run_dir = _run_dir(path)
    ranks = [_open(rank_dir, _read_facts, FACT_TABLES) for _, rank_dir in rank_run_dirs(run_dir)]
    if not ranks:
        raise GradtraceError(f"No gradtrace run at '{run_dir}' (no rank-N runs).")
    counts = [facts.meta.get(FINDINGS_AT_CLOSE) for facts in ranks]
    closed = all(isinstance(count, int) for count in counts)
    meta = _job_meta([facts.meta for facts in ranks])
    return RunFacts(run_dir, meta, ranks[0].steps), sum(counts) if closed else None


def _read_timeline(db: sqlite3.Connection) -> dict[str, Any]:
    """Spans, traced writes and thread names."""
    spans = [Span(*row) for row in db.execute(SPANS.select)]
    fields = len(TRACED_WRITES.fields)
    writes = [
        TracedWrite(*row[:fields], _traced_source(*row[fields:]))
        for row in db.execute(TRACED_WRITES.select)
    ]
    threads = dict(db.execute(THREADS.select))
    return {"spans": spans, "traced_writes": writes, "threads": threads}


def _traced_source(
    file: str | None, line: int | None, function: str | None, code: str | None
) -> SourceLine | None:
    """A traced write's first user frame, from its SOURCE_COLUMNS."""
    if file is None:
        return None
    return SourceLine(file, line, function, code or "")


def _read_grad_steps(db: sqlite3.Connection) -> list[StepGradStats]:
    params: dict[tuple[int, str], list[ParamStat]] = {}
    decode = _decoder(PARAM_STATS)
    for row in db.execute(PARAM_STATS.select):
        step, optimizer, *fields = decode(row)
        params.setdefault((step, optimizer), []).append(ParamStat(*fields))
    missing: dict[tuple[int, str], list[tuple[str, str]]] = {}
    for step, optimizer, param, module in db.execute(MISSING_GRADS.select):
        missing.setdefault((step, optimizer), []).append((param, module))
    nonfinite: dict[int, list[str]] = {}
    for step, _, module in db.execute(NONFINITE_OUTPUTS.select):
        nonfinite.setdefault(step, []).append(module)
    output_grads: dict[tuple[int, str], list[tuple[str, float]]] = {}
    for step, optimizer, module, norm in db.execute(OUTPUT_GRADS.select):
        output_grads.setdefault((step, optimizer), []).append((module, _real(norm)))
    clips: dict[tuple[int, str], list[ClipCall]] = {}
    decode = _decoder(GRAD_CLIPS)
    for row in db.execute(GRAD_CLIPS.select):
        step, optimizer, *fields = decode(row)
        clips.setdefault((step, optimizer), []).append(ClipCall(*fields))
    dead: dict[tuple[int, str], list[tuple[str, int, int]]] = {}
    for step, optimizer, module, count, units in db.execute(DEAD_UNITS.select):
        dead.setdefault((step, optimizer), []).append((module, count, units))
    cuts: dict[int, list[str]] = {}
    for step, module in db.execute(GRAPH_CUTS.select):
        cuts.setdefault(step, []).append(module)
    keys = sorted({*params, *missing})
    return [
        StepGradStats(
            step=step,
            optimizer=optimizer,
            params=tuple(params.get((step, optimizer), ())),
            missing=tuple(missing.get((step, optimizer), ())),
            nonfinite_outputs=tuple(nonfinite.get(step, ())),
            cut=tuple(cuts.get(step, ())),
            new_sites=(),
            output_grad_norms=tuple(output_grads.get((step, optimizer), ())),
            clips=tuple(clips.get((step, optimizer), ())),
            dead_units=tuple(dead.get((step, optimizer), ())),
        )
        for step, optimizer in keys
    ]


def _read_histograms(db: sqlite3.Connection) -> list[GradHistogram]:
    return [
        GradHistogram(step, param, _histogram_counts(json.loads(counts)))
        for step, param, counts in db.execute(GRAD_HISTOGRAMS.select)
    ]


def _read_rank_norms(db: sqlite3.Connection) -> list[RankNorms]:
    rows: dict[tuple[int, str], dict[int, list[tuple[str, float, float]]]] = {}
    for step, optimizer, param, rank, grad, norm in db.execute(RANK_NORMS.select):
        rows.setdefault((step, optimizer), {}).setdefault(rank, []).append(
            (param, _real(grad), _real(norm))
        )
    return [
        RankNorms(
            step=step,
            optimizer=optimizer,
            params=tuple(param for param, _, _ in by_rank[min(by_rank)]),
            grad_norms=tuple(tuple(g for _, g, _ in by_rank[r]) for r in sorted(by_rank)),
            param_norms=tuple(tuple(p for _, _, p in by_rank[r]) for r in sorted(by_rank)),
        )
        for (step, optimizer), by_rank in rows.items()
    ]


def _read_probe_failures(db: sqlite3.Connection) -> list[ProbeFailure]:
    return [ProbeFailure(*row) for row in db.execute(PROBE_FAILURES.select)]


def _decoder(table: Table) -> Callable[[tuple[Any, ...]], list[Any]]:
    """A row of `table` as its record type holds it: NULL in a REAL column is NaN, and
    names are interned (SQLite hands out a new string per row, and a long run has
    parameters × steps rows of the same few hundred names)."""
    reals = [i for i, column in enumerate(table.columns) if column.type == REAL]
    names = [
        i
        for i, column in enumerate(table.columns)
        if column.type == TEXT and not column.nullable and not column.json
    ]
    nan, intern = math.nan, sys.intern

    def decode(row: tuple[Any, ...]) -> list[Any]:
        values = list(row)
        for i in names:
            values[i] = intern(values[i])
        for i in reals:
            if values[i] is None:
                values[i] = nan
        return values

    return decode


def _real(value: float | None) -> float:
    """SQLite stores NaN as NULL."""
    return math.nan if value is None else value


class BrokenRun(ValueError):
    """A database SQLite reads whose contents are not what gradtrace writes (wrong types,
    NULLs, unbounded sizes): a damaged or hand-made run, refused in one line."""


# Checked here, once, so that analysis and reporters can trust every type they are given.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# SQLite value types (`typeof`) each declared column type may hold. REAL columns may hold
# integers: SQLite stores a whole float so when a table was declared without a type.
_VALUE_TYPES = {"INTEGER": ("integer",), "REAL": ("real", "integer"), "TEXT": ("text",)}
_INT64 = 2**63


def _check_column_types(db: sqlite3.Connection, tables: Iterable[Table]) -> None:
    """Every value of `tables` has its declared column's type (the types a database declares
    are not trusted: anyone can declare anything), and no name or line of code is longer than
    MAX_TEXT: one scan per table, inside SQLite, before a row is read into Python (a sixth of
    the time reading them back takes); a second query names what is wrong."""
    for table in tables:
        kind = db.execute("SELECT type FROM sqlite_master WHERE name = ?", (table.name,)).fetchone()
        if kind is not None and kind[0] != "table":
            # A view could compute anything (endless rows from a recursive query).
            raise BrokenRun(f"{table.name} is a {kind[0]}, not a table")
        checks = list(table.rules)
        for column in table.columns:
            types = _VALUE_TYPES[column.type]
            if column.nullable and not column.primary:
                types += ("null",)
            allowed = ", ".join(f"'{t}'" for t in types)
            what = " or ".join(t if t != "null" else "NULL" for t in types)
            where = f"{table.name}.{column.name}"
            checks.append((f"typeof([{column.name}]) NOT IN ({allowed})", f"{where}: not {what}"))
            if column.type == TEXT and not column.json:
                checks.append(
                    (
                        f"length([{column.name}]) > {MAX_TEXT}",
                        f"{where}: a text longer than {MAX_TEXT} characters",
                    )
                )
        wrong = " OR ".join(sql for sql, _ in checks)
        if db.execute(f"SELECT 1 FROM {table.name} WHERE {wrong} LIMIT 1").fetchone() is None:
            continue
        for sql, problem in checks:
            query = f"SELECT 1 FROM {table.name} WHERE {sql} LIMIT 1"
            if db.execute(query).fetchone() is not None:
                raise BrokenRun(problem)


Check = Callable[[Any, str], Any]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "text", list: "a list", dict: "an object"}.get(
        type(value), "a number"
    )


def _text(value: Any, where: str) -> str:
    """A string; lone surrogates (invalid in UTF-8) replaced, cut to MAX_TEXT characters."""
    if not isinstance(value, str):
        raise BrokenRun(f"{where} is {_kind(value)}, expected text")
    if len(value) > MAX_TEXT:
        value = value[:MAX_TEXT] + f"… ({len(value) - MAX_TEXT} more characters)"
    return _SURROGATE.sub("\ufffd", value)


def _integer(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not -_INT64 <= value < _INT64:
        raise BrokenRun(f"{where} is {_kind(value)}, expected a 64-bit integer")
    return value


def _number(value: Any, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BrokenRun(f"{where} is {_kind(value)}, expected a number")
    return value


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise BrokenRun(f"{where} is {_kind(value)}, expected true or false")
    return value


def _optional(check: Check) -> Check:
    return lambda value, where: None if value is None else check(value, where)


def _list_of(check: Check) -> Check:
    """A list of `check`ed items, cut to MAX_ITEMS."""

    def checked(value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise BrokenRun(f"{where} is {_kind(value)}, expected a list")
        return [check(item, f"{where}[{i}]") for i, item in enumerate(value[:MAX_ITEMS])]

    return checked


def _dict_of(check: Check) -> Check:
    def checked(value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise BrokenRun(f"{where} is {_kind(value)}, expected an object")
        items = list(value.items())[:MAX_ITEMS]
        return {_text(key, where): check(item, f"{where}.{key}") for key, item in items}

    return checked


def _record(
    fields: dict[str, Check], required: tuple[str, ...] = (), *, keep_unknown: bool
) -> Check:
    """An object whose known `fields` are checked; absent ones stay absent unless required.
    Unknown keys are kept (checked as plain JSON) when `keep_unknown`, else dropped."""

    def checked(value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise BrokenRun(f"{where} is {_kind(value)}, expected an object")
        for name in required:
            if name not in value:
                raise BrokenRun(f"{where} has no '{name}'")
        result = {}
        for key, item in list(value.items())[:MAX_ITEMS]:
            if key in fields:
                result[key] = fields[key](item, f"{where} '{key}'")
            elif keep_unknown:
                result[_text(key, where)] = _any(item, f"{where} '{key}'")
        return result

    return checked


def _any(value: Any, where: str, depth: int = 0) -> Any:
    """Plain JSON nested at most MAX_DEPTH deep, strings and lists bounded as elsewhere."""
    if depth > MAX_DEPTH:
        raise BrokenRun(f"{where} is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        return _text(value, where)
    if isinstance(value, list):
        return [_any(item, where, depth + 1) for item in value[:MAX_ITEMS]]
    if isinstance(value, dict):
        items = list(value.items())[:MAX_ITEMS]
        return {_text(key, where): _any(item, where, depth + 1) for key, item in items}
    return value


_TEXT_OR_NULL = _optional(_text)
_INTEGER_OR_NULL = _optional(_integer)

META: dict[str, Check] = {
    "format": _integer,
    "status": _text,
    "exit_code": _INTEGER_OR_NULL,
    "argv": _optional(_list_of(_text)),
    **dict.fromkeys(("level", "torch", "python", "platform", "cuda_device", "host"), _TEXT_OR_NULL),
    **dict.fromkeys(
        (
            "started_ns",
            "ended_ns",
            "every",
            "rank",
            "world_size",
            "first_failed_rank",
            "local_rank",
            "node_rank",
        ),
        _INTEGER_OR_NULL,
    ),
    "findings_at_close": _INTEGER_OR_NULL,
    "update_ratio": _optional(_flag),
    "exception": _optional(
        _record({"type": _text, "message": _text}, ("type", "message"), keep_unknown=True)
    ),
    "notices": _optional(_list_of(_text)),
    "checkpointed": _optional(_dict_of(_text)),
    "histogram_edges": _optional(_list_of(_number)),
    "param_shards": _optional(lambda value, where: _shard_counts(value, where)),
}
"""What each known meta key may hold; unknown keys (a newer gradtrace's) are plain JSON."""

_WHERE = ("file", "function", "code", "module", "op", "phase", "parameter", "node")
_SAVED_BY = _record(
    {
        **dict.fromkeys((*_WHERE, "dtype", "device"), _TEXT_OR_NULL),
        **dict.fromkeys(("line", "step", "version_saved", "version_now"), _INTEGER_OR_NULL),
        "shape": _optional(_list_of(_integer)),
    },
    keep_unknown=True,
)
_OTHER_WRITE = _record(
    {
        **dict.fromkeys(_WHERE, _TEXT_OR_NULL),
        **dict.fromkeys(("line", "step"), _INTEGER_OR_NULL),
    },
    keep_unknown=True,
)
_FINDING = _record(
    {
        "kind": _text,
        "message": _text,
        "hint": _text,
        "step": _integer,
        **dict.fromkeys(("phase", "op", "module", "file", "function", "code"), _TEXT_OR_NULL),
        "parameter": _TEXT_OR_NULL,
        "line": _INTEGER_OR_NULL,
        "saved_by": _SAVED_BY,
        "context_start": _integer,
        "context": _list_of(_text),
        "other_writes": _list_of(_OTHER_WRITE),
        "details": _dict_of(_any),
        "rank": _INTEGER_OR_NULL,
    },
    ("kind", "message", "hint", "step"),
    keep_unknown=False,
)
_SOURCE_LINE = _record(
    {
        "file": _text,
        "line": _integer,
        "function": _text,
        "code": _text,
        "context_start": _integer,
        "context": _list_of(_text),
    },
    ("file", "line", "function", "code"),
    keep_unknown=False,
)
_FINDING_DEFAULTS: dict[str, Any] = {
    **dict.fromkeys(("phase", "op", "module", "file", "line", "function", "code")),
    "saved_by": {},
}


def _shard_counts(value: Any, where: str) -> dict[str, int]:
    """Sharded parameter -> ranks holding each element: every one, uncut (a parameter
    cut from it would be reported as one rank's shard)."""
    if not isinstance(value, dict):
        raise BrokenRun(f"{where} is {_kind(value)}, expected an object")
    counts = {_text(key, where): _integer(count, f"{where}.{key}") for key, count in value.items()}
    if any(count < 0 for count in counts.values()):
        raise BrokenRun(f"{where} holds a negative count")
    return counts


def _finding(data: Any, where: str) -> Finding:
    return Finding.from_dict({**_FINDING_DEFAULTS, **_FINDING(data, where)})


def _source_line(data: Any, where: str) -> SourceLine:
    return SourceLine.from_dict(_SOURCE_LINE(data, where))


def _histogram_counts(data: Any) -> tuple[int, ...]:
    counts = _list_of(_integer)(data, "grad_histograms.counts")
    if len(counts) != len(HISTOGRAM_EDGES) + 1 or min(counts) < 0:
        raise BrokenRun(
            f"grad_histograms.counts holds {len(counts)} counts, expected "
            f"{len(HISTOGRAM_EDGES) + 1} non-negative ones"
        )
    return tuple(counts)
