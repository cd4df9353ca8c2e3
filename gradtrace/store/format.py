"""The run directory's layout and schema, versioned.

A run directory holds one SQLite database, `run.sqlite`. SQLite because it is in the standard
library, survives a SIGKILL mid-write (WAL: every committed step stays readable), can be
queried with any SQLite tool, and holds plain data only: a run someone mails you is safe to
open. Bump FORMAT_VERSION on any incompatible change; readers refuse newer formats.
Columns and tables added later are optional: the reader fills them with defaults when an
older run directory lacks them, and older readers never select them.
"""

from __future__ import annotations

from pathlib import Path

FORMAT_VERSION = 1
DATABASE = "run.sqlite"

# Meta key: the number of findings `close` found (stored plus derived from the series), so
# that listing runs need not read a closed run's series back. Absent for a killed run.
FINDINGS_AT_CLOSE = "findings_at_close"

# A torchrun job's run directory holds one run directory per rank, `rank-<RANK>`, and no
# database of its own: every process writes only its own files.
RANK_DIR_PREFIX = "rank-"

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
    value REAL                       -- NULL means NaN
);
CREATE TABLE IF NOT EXISTS param_stats (
    step INTEGER NOT NULL,
    optimizer TEXT NOT NULL,         -- "AdamW.step"
    param TEXT NOT NULL,             -- "encoder.0.weight"
    module TEXT NOT NULL,            -- module holding it directly
    numel INTEGER NOT NULL,
    grad_norm REAL,                  -- L2; NULL means NaN (SQLite has no NaN), Inf is kept
    param_norm REAL,
    zero_fraction REAL,              -- exactly-zero gradient entries / numel
    arrival INTEGER NOT NULL,        -- backward arrival order, -1 unknown
    update_norm REAL                 -- ‖p_after - p_before‖ (opt-in); NULL: not recorded
);
CREATE TABLE IF NOT EXISTS missing_grads (
    step INTEGER NOT NULL,
    optimizer TEXT NOT NULL,
    param TEXT NOT NULL,
    module TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nonfinite_outputs (
    step INTEGER NOT NULL,
    position INTEGER NOT NULL,       -- forward order among the step's non-finite outputs
    module TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS graph_cuts (
    step INTEGER NOT NULL,
    module TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS output_grads (
    step INTEGER NOT NULL,
    optimizer TEXT NOT NULL,
    module TEXT NOT NULL,            -- a parameter-free module (activation, dropout, ...)
    grad_norm REAL                   -- L2 norm of the gradient at its output; NULL means NaN
);
CREATE TABLE IF NOT EXISTS grad_clips (
    step INTEGER NOT NULL,
    optimizer TEXT NOT NULL,         -- the step the clipped gradients went into
    norm_before REAL,                -- total norm clip_grad_norm_ returned; NULL means NaN
    max_norm REAL,
    norm_type REAL                   -- p of the p-norm (Inf for the max norm)
);
CREATE TABLE IF NOT EXISTS dead_units (
    step INTEGER NOT NULL,           -- sampled steps only (every tenth recorded step)
    optimizer TEXT NOT NULL,
    module TEXT NOT NULL,            -- a ReLU or ReLU6 module, its first call of the step
    dead INTEGER NOT NULL,           -- units whose output was zero for the whole batch
    units INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS module_sites (
    module TEXT PRIMARY KEY,
    source TEXT                      -- JSON of gradtrace.events.SourceLine: where it is called
);
CREATE TABLE IF NOT EXISTS grad_histograms (
    step INTEGER NOT NULL,           -- --grad-histograms: every N-th recorded step
    param TEXT NOT NULL,
    counts TEXT NOT NULL             -- JSON list, one count per bin of meta.histogram_edges
);
CREATE TABLE IF NOT EXISTS rank_norms (
    step INTEGER NOT NULL,           -- --check-ranks: every rank's norms, kept by rank 0
    optimizer TEXT NOT NULL,
    param TEXT NOT NULL,
    rank INTEGER NOT NULL,
    grad_norm REAL,                  -- NULL means NaN
    param_norm REAL
);
CREATE TABLE IF NOT EXISTS spans (   -- traced steps only (--trace-steps)
    step INTEGER NOT NULL,
    kind TEXT NOT NULL,              -- "forward" | "backward" (of a module) | "optimizer"
    name TEXT NOT NULL,              -- module path, or the optimizer ("AdamW.step")
    thread INTEGER NOT NULL,         -- native thread id
    depth INTEGER NOT NULL,          -- module nesting depth in forward, 0 for roots
    start_ns INTEGER NOT NULL,       -- wall clock, as steps.end_ns
    end_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS traced_writes (   -- every mutating op of traced steps
    step INTEGER NOT NULL,
    t_ns INTEGER NOT NULL,
    thread INTEGER NOT NULL,
    op TEXT NOT NULL,
    owner TEXT NOT NULL,             -- as write_counts.owner
    phase TEXT NOT NULL,
    file TEXT,                       -- first user frame; NULL when none
    line INTEGER,
    function TEXT,
    code TEXT
);
CREATE TABLE IF NOT EXISTS threads (
    thread INTEGER PRIMARY KEY,      -- native thread id
    name TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS probe_failures (  -- a probe that raised and switched itself off
    probe TEXT NOT NULL,             -- "gradient statistics", "write log", ...
    step INTEGER NOT NULL,           -- the step in progress when it failed
    error TEXT NOT NULL,             -- the exception's type
    message TEXT NOT NULL,
    location TEXT NOT NULL           -- innermost gradtrace frame: "gradtrace/probes/x.py:12 in f"
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
