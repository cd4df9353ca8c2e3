"""Read a run directory back, refusing anything that is not a gradtrace run we understand."""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradtrace.errors import GradtraceError
from gradtrace.events import Finding, ParamStat, SourceLine, Span, StepGradStats, TracedWrite
from gradtrace.store.format import DATABASE, FORMAT_VERSION, KILLED, RUNNING


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
    # Traced steps (--trace-steps): module and optimizer spans, every write, thread names.
    # Empty for runs recorded before gradtrace kept them.
    spans: list[Span] = field(default_factory=list)
    traced_writes: list[TracedWrite] = field(default_factory=list)
    threads: dict[int, str] = field(default_factory=dict)

    @property
    def writes(self) -> int:
        return sum(row[3] for row in self.write_counts)

    @property
    def status(self) -> str:
        status = self.meta.get("status", RUNNING)
        return KILLED if status == RUNNING else status


def load_run(path: str | Path) -> Run:
    """Open a run directory written by `gradtrace run` (or any gradtrace front end)."""
    run_dir = Path(path)
    database = run_dir / DATABASE
    if not run_dir.is_dir():
        raise GradtraceError(f"No gradtrace run at '{run_dir}' (not a directory).")
    if not database.is_file():
        raise GradtraceError(
            f"No gradtrace run at '{run_dir}' (no {DATABASE}). "
            "Use the directory printed by 'gradtrace run'."
        )
    try:
        db = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return _read(run_dir, db)
        finally:
            db.close()
    except (sqlite3.DatabaseError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise GradtraceError(
            f"'{database}' is not a readable gradtrace run ({error}). "
            "It may be corrupt or written by another program."
        ) from None


def _read(run_dir: Path, db: sqlite3.Connection) -> Run:
    meta = {key: json.loads(value) for key, value in db.execute("SELECT key, value FROM meta")}
    version = meta.get("format")
    if not isinstance(version, int):
        raise GradtraceError(f"'{run_dir}' has no gradtrace format version; not a gradtrace run.")
    if version > FORMAT_VERSION:
        raise GradtraceError(
            f"'{run_dir}' was written in run format {version}; this gradtrace reads up to "
            f"{FORMAT_VERSION}. Upgrade gradtrace (pip install -U gradtrace)."
        )
    findings = [
        StoredFinding(Finding.from_dict(json.loads(body)), count)
        for body, count in db.execute("SELECT body, count FROM findings ORDER BY id")
    ]
    (steps,) = db.execute("SELECT COUNT(*) FROM steps").fetchone()
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
        **_read_timeline(db),
    )


def _read_timeline(db: sqlite3.Connection) -> dict[str, Any]:
    """Spans, traced writes and thread names; empty when the run predates these tables."""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not {"spans", "traced_writes", "threads"} <= tables:
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
    for step, optimizer, name, module, numel, grad, norm, zeros, arrival in db.execute(
        "SELECT step, optimizer, param, module, numel, grad_norm, param_norm, zero_fraction, "
        "arrival FROM param_stats ORDER BY rowid"
    ):
        params.setdefault((step, optimizer), []).append(
            ParamStat(name, module, numel, _real(grad), _real(norm), _real(zeros), arrival)
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
        )
        for step, optimizer in keys
    ]


def _real(value: float | None) -> float:
    """SQLite stores NaN as NULL."""
    return math.nan if value is None else value
