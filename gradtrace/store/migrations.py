"""Bring a run written in an older format up to FORMAT_VERSION as it is read.

`MIGRATIONS[v]` turns a format-v database into a format-(v+1) one. The reader applies them in
order to a private copy of the database (a run directory it reads is never written). Each is
written against the schema as it stood at its version, with its SQL spelt out here rather than
derived from `store/format.py`, whose declarations move on; each has a test that builds a run
of its old format by hand and reads it back through `gradtrace report`.

A change to the schema bumps FORMAT_VERSION and adds its migration here. A field `foo_norm`
added to the record type `ParamStat` (format 2 -> 3) adds

    2: Migration(frozenset({"param_stats"}), _from_2),

with `_from_2` running `ALTER TABLE param_stats ADD COLUMN foo_norm REAL` (NULL: NaN).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from gradtrace.store.format import FORMAT_VERSION


@dataclass(frozen=True)
class Migration:
    """One step up from a format version to the next."""

    # Tables it changes or creates: a reader that reads none of them need not migrate.
    tables: frozenset[str]
    apply: Callable[[sqlite3.Connection], None]


# Tables format 1 gained while it was current (without a version bump), as they stood at
# format 2. A format-1 run holds those that existed when it was recorded.
_FORMAT_1_LATER_TABLES = """
CREATE TABLE IF NOT EXISTS scalars (step INTEGER NOT NULL, name TEXT NOT NULL, value REAL);
CREATE TABLE IF NOT EXISTS param_stats (step INTEGER NOT NULL, optimizer TEXT NOT NULL,
    param TEXT NOT NULL, module TEXT NOT NULL, numel INTEGER NOT NULL, grad_norm REAL,
    param_norm REAL, zero_fraction REAL, arrival INTEGER NOT NULL, update_norm REAL);
CREATE TABLE IF NOT EXISTS missing_grads (step INTEGER NOT NULL, optimizer TEXT NOT NULL,
    param TEXT NOT NULL, module TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nonfinite_outputs (step INTEGER NOT NULL, position INTEGER NOT NULL,
    module TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS graph_cuts (step INTEGER NOT NULL, module TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS output_grads (step INTEGER NOT NULL, optimizer TEXT NOT NULL,
    module TEXT NOT NULL, grad_norm REAL);
CREATE TABLE IF NOT EXISTS grad_clips (step INTEGER NOT NULL, optimizer TEXT NOT NULL,
    norm_before REAL, max_norm REAL, norm_type REAL);
CREATE TABLE IF NOT EXISTS dead_units (step INTEGER NOT NULL, optimizer TEXT NOT NULL,
    module TEXT NOT NULL, dead INTEGER NOT NULL, units INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS module_sites (module TEXT PRIMARY KEY, source TEXT);
CREATE TABLE IF NOT EXISTS grad_histograms (step INTEGER NOT NULL, param TEXT NOT NULL,
    counts TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rank_norms (step INTEGER NOT NULL, optimizer TEXT NOT NULL,
    param TEXT NOT NULL, rank INTEGER NOT NULL, grad_norm REAL, param_norm REAL);
CREATE TABLE IF NOT EXISTS spans (step INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    thread INTEGER NOT NULL, depth INTEGER NOT NULL, start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS traced_writes (step INTEGER NOT NULL, t_ns INTEGER NOT NULL,
    thread INTEGER NOT NULL, op TEXT NOT NULL, owner TEXT NOT NULL, phase TEXT NOT NULL,
    file TEXT, line INTEGER, function TEXT, code TEXT);
CREATE TABLE IF NOT EXISTS threads (thread INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS probe_failures (probe TEXT NOT NULL, step INTEGER NOT NULL,
    error TEXT NOT NULL, message TEXT NOT NULL, location TEXT NOT NULL);
"""


def _from_1(db: sqlite3.Connection) -> None:
    """Format 1 -> 2: create the tables a format-1 run may lack, empty, and the
    `param_stats.update_norm` column (NULL: not recorded).

    Format 1 was not one schema: tables and that column were added while it was current, so
    this one migration looks at which columns `param_stats` has. From format 2 on, the version
    alone says what a run holds.
    """
    db.executescript(_FORMAT_1_LATER_TABLES)
    columns = {row[1] for row in db.execute("PRAGMA table_info(param_stats)")}
    if "update_norm" not in columns:
        db.execute("ALTER TABLE param_stats ADD COLUMN update_norm REAL")


MIGRATIONS: dict[int, Migration] = {
    1: Migration(
        frozenset(
            {
                "scalars",
                "param_stats",
                "missing_grads",
                "nonfinite_outputs",
                "graph_cuts",
                "output_grads",
                "grad_clips",
                "dead_units",
                "module_sites",
                "grad_histograms",
                "rank_norms",
                "spans",
                "traced_writes",
                "threads",
                "probe_failures",
            }
        ),
        _from_1,
    ),
}


def pending(version: int) -> list[Migration]:
    """The migrations that bring a run of format `version` to FORMAT_VERSION, in order."""
    return [MIGRATIONS[v] for v in range(version, FORMAT_VERSION)]
