"""Read a run directory back, refusing anything that is not a gradtrace run we understand."""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gradtrace.errors import GradtraceError
from gradtrace.events import (
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
from gradtrace.store.format import DATABASE, FORMAT_VERSION, KILLED, OK, RUNNING, rank_run_dirs

T = TypeVar("T")


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
    return _open(run_dir, _read)


def load_facts(path: str | Path) -> RunFacts | None:
    """A run's metadata and step count, checked as `load_run` checks them, in one query of
    each: for listing runs whose series would take seconds to read. None for a torchrun
    job's directory (it has no database of its own)."""
    run_dir = _run_dir(path)
    if not (run_dir / DATABASE).is_file() and rank_run_dirs(run_dir):
        return None
    return _open(run_dir, _read_facts)


def _run_dir(path: str | Path) -> Path:
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise GradtraceError(f"No gradtrace run at '{run_dir}' (not a directory).")
    return run_dir


def _open(run_dir: Path, read: Callable[[Path, sqlite3.Connection], T]) -> T:
    """`read` the run's database, read-only; anything unreadable is a one-line error."""
    database = run_dir / DATABASE
    if not database.is_file():
        raise GradtraceError(
            f"No gradtrace run at '{run_dir}' (no {DATABASE}). "
            "Use the directory printed by 'gradtrace run'."
        )
    try:
        db = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return read(run_dir, db)
        finally:
            db.close()
    except (sqlite3.DatabaseError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise GradtraceError(
            f"'{database}' is not a readable gradtrace run ({error}). "
            "It may be corrupt or written by another program."
        ) from None


def _read_facts(run_dir: Path, db: sqlite3.Connection) -> RunFacts:
    return RunFacts(run_dir, _read_meta(run_dir, db), _count_steps(db))


def _read_meta(run_dir: Path, db: sqlite3.Connection) -> dict[str, Any]:
    meta = {key: json.loads(value) for key, value in db.execute("SELECT key, value FROM meta")}
    version = meta.get("format")
    if not isinstance(version, int):
        raise GradtraceError(f"'{run_dir}' has no gradtrace format version; not a gradtrace run.")
    if version > FORMAT_VERSION:
        raise GradtraceError(
            f"'{run_dir}' was written in run format {version}; this gradtrace reads up to "
            f"{FORMAT_VERSION}. Upgrade gradtrace (pip install -U gradtrace)."
        )
    return meta


def _count_steps(db: sqlite3.Connection) -> int:
    (steps,) = db.execute("SELECT COUNT(*) FROM steps").fetchone()
    return steps


def _read(run_dir: Path, db: sqlite3.Connection) -> Run:
    meta = _read_meta(run_dir, db)
    findings = [
        StoredFinding(Finding.from_dict(json.loads(body)), count)
        for body, count in db.execute("SELECT body, count FROM findings ORDER BY id")
    ]
    steps = _count_steps(db)
    write_counts = [
        tuple(row)
        for row in db.execute(
            "SELECT owner, op, phase, SUM(count) AS n FROM write_counts "
            "GROUP BY owner, op, phase ORDER BY n DESC"
        )
    ]
    step_write_counts = [
        tuple(row)
        for row in db.execute(
            "SELECT step, owner, op, phase, SUM(count) FROM write_counts "
            "GROUP BY step, owner, op, phase ORDER BY step, MIN(rowid)"
        )
    ]
    scalars: dict[str, list[tuple[int, float]]] = {}
    for step, name, value in db.execute("SELECT step, name, value FROM scalars ORDER BY step"):
        scalars.setdefault(name, []).append((step, _real(value)))
    return Run(
        path=run_dir,
        scalars=scalars,
        grad_steps=_read_grad_steps(db),
        module_sites={
            module: SourceLine.from_dict(json.loads(source)) if source else None
            for module, source in db.execute("SELECT module, source FROM module_sites")
        },
        meta=meta,
        findings=findings,
        steps=steps,
        write_counts=write_counts,
        step_write_counts=step_write_counts,
        step_end_ns=dict(db.execute("SELECT step, end_ns FROM steps ORDER BY step")),
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
    failed = sorted(
        (run for run in runs if run.status != OK),
        key=lambda run: (run.meta.get("ended_ns") is None, run.meta.get("ended_ns") or 0),
    )
    outcome = failed[0].meta if failed else first.meta
    meta = {
        **first.meta,
        **{key: outcome.get(key) for key in ("status", "exit_code", "exception", "ended_ns")},
        "world_size": first.meta.get("world_size", len(runs)),
        "first_failed_rank": failed[0].rank if failed else None,
    }
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
    )


def _read_timeline(db: sqlite3.Connection) -> dict[str, Any]:
    """Spans, traced writes and thread names; empty when the run predates these tables."""
    if not all(_columns(db, table) for table in ("spans", "traced_writes", "threads")):
        return {}
    spans = [
        Span(*row)
        for row in db.execute(
            "SELECT step, kind, name, thread, depth, start_ns, end_ns FROM spans ORDER BY rowid"
        )
    ]
    writes = [
        TracedWrite(
            step,
            t_ns,
            thread,
            op,
            owner,
            phase,
            None if file is None else SourceLine(file, line, function, code or ""),
        )
        for step, t_ns, thread, op, owner, phase, file, line, function, code in db.execute(
            "SELECT step, t_ns, thread, op, owner, phase, file, line, function, code "
            "FROM traced_writes ORDER BY rowid"
        )
    ]
    threads = dict(db.execute("SELECT thread, name FROM threads"))
    return {"spans": spans, "traced_writes": writes, "threads": threads}


def _read_grad_steps(db: sqlite3.Connection) -> list[StepGradStats]:
    params: dict[tuple[int, str], list[ParamStat]] = {}
    update = "update_norm" if "update_norm" in _columns(db, "param_stats") else "NULL"
    # Interned: SQLite hands out a new string per row, and a long run has (parameters ×
    # steps) rows of the same few hundred names. NULL -> NaN as `_real` does, inlined.
    nan = math.nan
    for step, optimizer, name, module, numel, grad, norm, zeros, arrival, moved in db.execute(
        "SELECT step, optimizer, param, module, numel, grad_norm, param_norm, zero_fraction, "
        f"arrival, {update} FROM param_stats ORDER BY rowid"
    ):
        params.setdefault((step, sys.intern(optimizer)), []).append(
            ParamStat(
                sys.intern(name),
                sys.intern(module),
                numel,
                nan if grad is None else grad,
                nan if norm is None else norm,
                nan if zeros is None else zeros,
                arrival,
                nan if moved is None else moved,
            )
        )
    missing: dict[tuple[int, str], list[tuple[str, str]]] = {}
    for step, optimizer, param, module in db.execute(
        "SELECT step, optimizer, param, module FROM missing_grads ORDER BY rowid"
    ):
        missing.setdefault((step, optimizer), []).append((param, module))
    nonfinite: dict[int, list[str]] = {}
    for step, module in db.execute(
        "SELECT step, module FROM nonfinite_outputs ORDER BY step, position"
    ):
        nonfinite.setdefault(step, []).append(module)
    output_grads: dict[tuple[int, str], list[tuple[str, float]]] = {}
    for step, optimizer, module, norm in db.execute(
        "SELECT step, optimizer, module, grad_norm FROM output_grads ORDER BY rowid"
    ):
        output_grads.setdefault((step, optimizer), []).append((module, _real(norm)))
    clips: dict[tuple[int, str], list[ClipCall]] = {}
    if _columns(db, "grad_clips"):
        for step, optimizer, before, max_norm, norm_type in db.execute(
            "SELECT step, optimizer, norm_before, max_norm, norm_type FROM grad_clips "
            "ORDER BY rowid"
        ):
            clips.setdefault((step, optimizer), []).append(
                ClipCall(_real(before), _real(max_norm), _real(norm_type))
            )
    dead: dict[tuple[int, str], list[tuple[str, int, int]]] = {}
    if _columns(db, "dead_units"):
        for step, optimizer, module, count, units in db.execute(
            "SELECT step, optimizer, module, dead, units FROM dead_units ORDER BY rowid"
        ):
            dead.setdefault((step, optimizer), []).append((module, count, units))
    cuts: dict[int, list[str]] = {}
    for step, module in db.execute("SELECT step, module FROM graph_cuts ORDER BY rowid"):
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
    if not _columns(db, "grad_histograms"):  # runs recorded before --grad-histograms existed
        return []
    return [
        GradHistogram(step, param, tuple(json.loads(counts)))
        for step, param, counts in db.execute(
            "SELECT step, param, counts FROM grad_histograms ORDER BY step, rowid"
        )
    ]


def _read_rank_norms(db: sqlite3.Connection) -> list[RankNorms]:
    if not _columns(db, "rank_norms"):  # runs recorded before --check-ranks existed
        return []
    rows: dict[tuple[int, str], dict[int, list[tuple[str, float, float]]]] = {}
    for step, optimizer, param, rank, grad, norm in db.execute(
        "SELECT step, optimizer, param, rank, grad_norm, param_norm FROM rank_norms "
        "ORDER BY step, rowid"
    ):
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
    if not _columns(db, "probe_failures"):  # runs recorded before probes reported failures
        return []
    return [
        ProbeFailure(*row)
        for row in db.execute(
            "SELECT probe, step, error, message, location FROM probe_failures ORDER BY rowid"
        )
    ]


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    """The table's columns; empty when it does not exist (a run written before it did)."""
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _real(value: float | None) -> float:
    """SQLite stores NaN as NULL."""
    return math.nan if value is None else value
