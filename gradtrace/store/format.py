"""The run directory's layout and schema, versioned.

A run directory holds one SQLite database, `run.sqlite`. SQLite because it is in the standard
library, survives a SIGKILL mid-write (WAL: every committed step stays readable), can be
queried with any SQLite tool, and holds plain data only: a run someone mails you is safe to
open. Bump FORMAT_VERSION on any incompatible change; readers refuse newer formats.
"""

from __future__ import annotations

FORMAT_VERSION = 1
DATABASE = "run.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL              -- JSON
);
CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY,        -- optimizer step index, from 0
    end_ns INTEGER NOT NULL          -- wall clock when the step finished
);
CREATE TABLE IF NOT EXISTS write_counts (
    step INTEGER NOT NULL,           -- may be one past the last finished step (the run's tail)
    owner TEXT NOT NULL,             -- module path, optimizer ("AdamW.step") or "training loop"
    op TEXT NOT NULL,
    phase TEXT NOT NULL,
    count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS scalars (
    step INTEGER NOT NULL,
    name TEXT NOT NULL,              -- e.g. "loss" from Session.log(loss=...)
    value REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS findings (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    step INTEGER NOT NULL,
    count INTEGER NOT NULL,          -- occurrences of the same finding (same write, same save)
    body TEXT NOT NULL               -- JSON of gradtrace.events.Finding
);
"""

# Run status, as `meta.status` holds it. A run whose process died without closing the store
# stays "running"; readers show it as "killed".
RUNNING = "running"
OK = "ok"
FAILED = "failed"
INTERRUPTED = "interrupted"
KILLED = "killed"
