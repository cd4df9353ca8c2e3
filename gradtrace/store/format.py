"""The run directory's layout and schema, versioned.

A run directory holds one SQLite database, `run.sqlite`. SQLite because it is in the standard
library, survives a SIGKILL mid-write (WAL: every committed step stays readable), can be
queried with any SQLite tool, and holds plain data only: a run someone mails you is safe to
open.

Each table is declared once, here. A table that stores a record type of `gradtrace.events`
takes its columns from the record's fields (`ParamStat` -> `param_stats`), so a field added
there is a column here; the others list their columns. The writer's CREATE and INSERT
statements and the reader's SELECTs and type checks are derived from these declarations.

FORMAT_VERSION numbers the schema. Any change to it (a table or column added, renamed or
retyped) bumps the version and adds the migration from the previous version to
`store/migrations.py`; the reader applies it to older runs on a private copy, and refuses
runs newer than it knows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradtrace.events import ClipCall, GradHistogram, ParamStat, ProbeFailure, Span, TracedWrite

# 2: every table and column below exists in every run (format 1 gained tables and the
# `param_stats.update_norm` column while it was current, so its runs differ).
FORMAT_VERSION = 2
DATABASE = "run.sqlite"

# Meta key: the number of findings `close` found (stored plus derived from the series), so
# that listing runs need not read a closed run's series back. Absent for a killed run.
FINDINGS_AT_CLOSE = "findings_at_close"

# A torchrun job's run directory holds one run directory per rank, `rank-<RANK>`, and no
# database of its own: every process writes only its own files.
RANK_DIR_PREFIX = "rank-"

INTEGER = "INTEGER"
REAL = "REAL"  # NULL stands for NaN (SQLite has none); Inf is kept
TEXT = "TEXT"


@dataclass(frozen=True)
class Column:
    """One column of a table. A nullable REAL column holds NULL for NaN; a `json` TEXT column
    holds JSON (its strings are checked once decoded, not as stored text)."""

    name: str
    type: str
    nullable: bool = False
    primary: bool = False
    # An INTEGER PRIMARY KEY that SQLite assigns: left out of the INSERT.
    assigned: bool = False
    json: bool = False
    note: str = ""

    @property
    def sql(self) -> str:
        constraint = " PRIMARY KEY" if self.primary else "" if self.nullable else " NOT NULL"
        return f"{self.name} {self.type}{constraint}"


@dataclass(frozen=True)
class Table:
    """A table's one declaration, from which its SQL is derived.

    A record table's last columns store the fields `fields` of its record type, in order;
    the columns before them are keys the record shares with its neighbours (step, optimizer).
    """

    name: str
    columns: tuple[Column, ...]
    note: str = ""
    # The order rows are read back in.
    order: str = "rowid"
    # "REPLACE" or "IGNORE": what an INSERT does with a row whose primary key exists.
    on_conflict: str = ""
    record: type | None = None
    fields: tuple[str, ...] = ()
    # Rows that are well typed but impossible: (SQL that is true for a bad row, the problem).
    rules: tuple[tuple[str, str], ...] = ()

    @property
    def create(self) -> str:
        note = f"  -- {self.note}" if self.note else ""
        lines = [f"CREATE TABLE IF NOT EXISTS {self.name} ({note}"]
        for i, column in enumerate(self.columns):
            comma = "," if i < len(self.columns) - 1 else ""
            note = f"  -- {column.note}" if column.note else ""
            lines.append(f"    {column.sql}{comma}{note}")
        return "\n".join([*lines, ");"])

    @functools.cached_property
    def insert(self) -> str:
        """INSERT of one row holding every column but an assigned key, in declared order."""
        names = [column.name for column in self.columns if not column.assigned]
        verb = f"INSERT OR {self.on_conflict}" if self.on_conflict else "INSERT"
        marks = ", ".join("?" * len(names))
        return f"{verb} INTO {self.name} ({', '.join(names)}) VALUES ({marks})"

    @functools.cached_property
    def select(self) -> str:
        """SELECT of every column, in declared order, rows in the declared read order."""
        names = ", ".join(column.name for column in self.columns)
        return f"SELECT {names} FROM {self.name} ORDER BY {self.order}"

    def rows(
        self,
        records: Iterable[Any],
        *keys: object,
        extra: Callable[[Any], tuple[object, ...]] | None = None,
    ) -> list[tuple[object, ...]]:
        """Rows storing `records` of the record type: the key values `keys`, the record's
        fields, then what `extra` makes of the record for the table's extra columns."""
        get = self._get_fields
        if extra is None:
            rows = [(*keys, *get(record)) for record in records]
        else:
            rows = [(*keys, *get(record), *extra(record)) for record in records]
        for i in self._json_positions:
            rows = [(*row[:i], json.dumps(row[i]), *row[i + 1 :]) for row in rows]
        return rows

    @functools.cached_property
    def _get_fields(self) -> Callable[[Any], tuple[object, ...]]:
        return operator.attrgetter(*self.fields)

    @functools.cached_property
    def _json_positions(self) -> tuple[int, ...]:
        return tuple(i for i, column in enumerate(self.columns) if column.json)


STEP = Column("step", INTEGER)
OPTIMIZER = Column("optimizer", TEXT, note='"AdamW.step"')
_COLUMN_TYPES = {int: INTEGER, float: REAL, str: TEXT}


def record_table(
    name: str,
    record: type,
    *,
    keys: tuple[Column, ...] = (),
    rename: dict[str, str] | None = None,
    skip: tuple[str, ...] = (),
    extra: tuple[Column, ...] = (),
    note: str = "",
    order: str = "rowid",
) -> Table:
    """The table storing a record type of `gradtrace.events`: `keys`, then one column per
    field (but `skip`), named as the field (or as `rename` says), then `extra` columns the
    writer and reader fill from the skipped fields.

    Types follow the field's annotation: int -> INTEGER, float -> REAL (NULL for NaN), str ->
    TEXT, a tuple -> TEXT holding JSON; `X | None` may be NULL.
    """
    hints = typing.get_type_hints(record)
    fields = tuple(f.name for f in dataclasses.fields(record) if f.name not in skip)
    columns = [_column((rename or {}).get(field, field), hints[field]) for field in fields]
    return Table(
        name,
        (*keys, *columns, *extra),
        note=note or f"one row per {record.__name__} (gradtrace.events)",
        order=order,
        record=record,
        fields=fields,
    )


def _column(name: str, hint: Any) -> Column:
    arguments = typing.get_args(hint)
    optional = (typing.get_origin(hint) in (typing.Union, types.UnionType)) and (
        type(None) in arguments
    )
    if optional:
        (hint,) = (argument for argument in arguments if argument is not type(None))
    if hint in _COLUMN_TYPES:
        return Column(name, _COLUMN_TYPES[hint], nullable=optional or hint is float)
    if typing.get_origin(hint) is tuple:
        return Column(name, TEXT, nullable=optional, json=True)
    raise TypeError(f"no column type for a field '{name}' of type {hint}")


META = Table(
    "meta",
    (Column("key", TEXT, primary=True), Column("value", TEXT, json=True, note="JSON")),
    on_conflict="REPLACE",
)
STEPS = Table(
    "steps",
    (
        Column("step", INTEGER, primary=True, note="optimizer step index, from 0"),
        Column("end_ns", INTEGER, note="wall clock when the step finished"),
    ),
    order="step",
    on_conflict="REPLACE",
)
WRITE_COUNTS = Table(
    "write_counts",
    (
        Column("step", INTEGER, note="may be one past the last finished step (the run's tail)"),
        Column("owner", TEXT, note='module path, optimizer ("AdamW.step") or "training loop"'),
        Column("op", TEXT),
        Column("phase", TEXT),
        Column("count", INTEGER),
    ),
)
# A run's in-place writes: (owner, op, phase, count) most frequent first, and
# (step, owner, op, phase, count) in step order.
WRITE_TOTALS = (
    "SELECT owner, op, phase, SUM(count) AS n FROM write_counts "
    "GROUP BY owner, op, phase ORDER BY n DESC"
)
WRITES_PER_STEP = (
    "SELECT step, owner, op, phase, SUM(count) FROM write_counts "
    "GROUP BY step, owner, op, phase ORDER BY step, MIN(rowid)"
)
SCALARS = Table(
    "scalars",
    (
        STEP,
        Column("name", TEXT, note='e.g. "loss" from Session.log(loss=...)'),
        Column("value", REAL, nullable=True),
    ),
    order="step, rowid",
)
PARAM_STATS = record_table(
    "param_stats", ParamStat, keys=(STEP, OPTIMIZER), rename={"name": "param"}
)
MISSING_GRADS = Table(
    "missing_grads",
    (STEP, OPTIMIZER, Column("param", TEXT), Column("module", TEXT)),
    note="trainable parameters whose .grad was None at the step",
)
NONFINITE_OUTPUTS = Table(
    "nonfinite_outputs",
    (
        STEP,
        Column("position", INTEGER, note="forward order among the step's non-finite outputs"),
        Column("module", TEXT),
    ),
    order="step, position",
)
GRAPH_CUTS = Table("graph_cuts", (STEP, Column("module", TEXT)))
OUTPUT_GRADS = Table(
    "output_grads",
    (
        STEP,
        OPTIMIZER,
        Column("module", TEXT, note="a parameter-free module (activation, dropout, ...)"),
        Column("grad_norm", REAL, nullable=True, note="L2 norm of the gradient at its output"),
    ),
)
GRAD_CLIPS = record_table("grad_clips", ClipCall, keys=(STEP, OPTIMIZER))
DEAD_UNITS = Table(
    "dead_units",
    (
        Column("step", INTEGER, note="sampled steps only (every tenth recorded step)"),
        OPTIMIZER,
        Column("module", TEXT, note="a ReLU or ReLU6 module, its first call of the step"),
        Column("dead", INTEGER, note="units whose output was zero for the whole batch"),
        Column("units", INTEGER),
    ),
    rules=(("units <= 0 OR dead < 0 OR dead > units", "dead_units: dead not in 0…units"),),
)
MODULE_SITES = Table(
    "module_sites",
    (
        Column("module", TEXT, primary=True),
        Column(
            "source",
            TEXT,
            nullable=True,
            json=True,
            note="JSON of gradtrace.events.SourceLine: where it is called",
        ),
    ),
    on_conflict="IGNORE",
)
GRAD_HISTOGRAMS = record_table(
    "grad_histograms",
    GradHistogram,
    note="--grad-histograms: every N-th recorded step; counts per bin of meta.histogram_edges",
    order="step, rowid",
)
RANK_NORMS = Table(
    "rank_norms",
    (
        STEP,
        OPTIMIZER,
        Column("param", TEXT),
        Column("rank", INTEGER),
        Column("grad_norm", REAL, nullable=True),
        Column("param_norm", REAL, nullable=True),
    ),
    note="--check-ranks: every rank's norms, kept by rank 0",
    order="step, rowid",
)
SPANS = record_table("spans", Span, note="traced steps only (--trace-steps)")
# The first user frame of a traced write, without its context lines; NULL when none.
SOURCE_COLUMNS = tuple(
    Column(name, kind, nullable=True)
    for name, kind in (("file", TEXT), ("line", INTEGER), ("function", TEXT), ("code", TEXT))
)
TRACED_WRITES = record_table(
    "traced_writes",
    TracedWrite,
    skip=("source",),
    extra=SOURCE_COLUMNS,
    note="every mutating op of traced steps",
)
THREADS = Table(
    "threads",
    (Column("thread", INTEGER, primary=True, note="native thread id"), Column("name", TEXT)),
    on_conflict="IGNORE",
)
PROBE_FAILURES = record_table(
    "probe_failures",
    ProbeFailure,
    rename={"where": "location"},
    skip=("rank",),
    note="a probe that raised and switched itself off",
)
FINDINGS = Table(
    "findings",
    (
        Column("id", INTEGER, primary=True, assigned=True),
        Column("kind", TEXT),
        Column("step", INTEGER),
        Column("count", INTEGER, note="occurrences of the same finding (same write, same save)"),
        Column("body", TEXT, json=True, note="JSON of gradtrace.events.Finding"),
    ),
    order="id",
)
# A known finding seen again.
FINDING_REPEATED = "UPDATE findings SET count = count + 1 WHERE id = ?"

TABLES = (
    META,
    STEPS,
    WRITE_COUNTS,
    SCALARS,
    PARAM_STATS,
    MISSING_GRADS,
    NONFINITE_OUTPUTS,
    GRAPH_CUTS,
    OUTPUT_GRADS,
    GRAD_CLIPS,
    DEAD_UNITS,
    MODULE_SITES,
    GRAD_HISTOGRAMS,
    RANK_NORMS,
    SPANS,
    TRACED_WRITES,
    THREADS,
    PROBE_FAILURES,
    FINDINGS,
)
SCHEMA = "\n".join(table.create for table in TABLES)

# Run status, as `meta.status` holds it. A run whose process died without closing the store
# stays "running"; readers show it as "killed".
RUNNING = "running"
OK = "ok"
FAILED = "failed"
INTERRUPTED = "interrupted"
KILLED = "killed"


def rank_run_dir(job_dir: Path, rank: int) -> Path:
    return job_dir / f"{RANK_DIR_PREFIX}{rank}"


def rank_run_dirs(job_dir: Path) -> list[tuple[int, Path]]:
    """(rank, run directory) of every rank recorded in a job directory, by rank."""
    found = []
    for child in job_dir.glob(f"{RANK_DIR_PREFIX}*"):
        suffix = child.name[len(RANK_DIR_PREFIX) :]
        if suffix.isdigit() and (child / DATABASE).is_file():
            found.append((int(suffix), child))
    return sorted(found)
