"""Runs written in an older run format open through the migrations of store/migrations.py.

Each test builds a run directory as an older gradtrace left it, its schema created by hand
with the SQL that gradtrace ran then, and reads it with today's `gradtrace report` in a
subprocess: a run someone recorded long ago and sends you. Reading never writes into it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cli_process import gradtrace

import gradtrace as gt
from gradtrace.errors import GradtraceError
from gradtrace.events import ClipCall, ParamStat, StepGradStats
from gradtrace.store import RunWriter
from gradtrace.store.format import DATABASE, FORMAT_VERSION
from gradtrace.store.migrations import MIGRATIONS

# The schema of the first gradtrace (format 1, before any gradient statistics).
FIRST_FORMAT_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE steps (step INTEGER PRIMARY KEY, end_ns INTEGER NOT NULL);
CREATE TABLE write_counts (step INTEGER NOT NULL, owner TEXT NOT NULL, op TEXT NOT NULL,
    phase TEXT NOT NULL, count INTEGER NOT NULL);
CREATE TABLE findings (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, step INTEGER NOT NULL,
    count INTEGER NOT NULL, body TEXT NOT NULL);
"""
# Format 1 once gradient statistics came, before update norms, clipping, dead units,
# histograms, rank norms, the timeline and probe failures.
GRADIENTS_FORMAT_1 = (
    FIRST_FORMAT_1
    + """
CREATE TABLE scalars (step INTEGER NOT NULL, name TEXT NOT NULL, value REAL NOT NULL);
CREATE TABLE param_stats (step INTEGER NOT NULL, optimizer TEXT NOT NULL, param TEXT NOT NULL,
    module TEXT NOT NULL, numel INTEGER NOT NULL, grad_norm REAL, param_norm REAL,
    zero_fraction REAL, arrival INTEGER NOT NULL);
CREATE TABLE missing_grads (step INTEGER NOT NULL, optimizer TEXT NOT NULL,
    param TEXT NOT NULL, module TEXT NOT NULL);
CREATE TABLE nonfinite_outputs (step INTEGER NOT NULL, position INTEGER NOT NULL,
    module TEXT NOT NULL);
CREATE TABLE graph_cuts (step INTEGER NOT NULL, module TEXT NOT NULL);
CREATE TABLE module_sites (module TEXT PRIMARY KEY, source TEXT);
"""
)
META = {
    "format": 1,
    "status": "failed",
    "exit_code": 1,
    "argv": ["train.py"],
    "level": "full",
    "started_ns": 1_700_000_000_000_000_000,
    "ended_ns": 1_700_000_005_000_000_000,
}
FINDING = {
    "kind": "inplace-saved-tensor",
    "message": "model.py:12 in act (relu_) overwrote the output that gate (sigmoid) saved",
    "hint": "Use the out-of-place relu.",
    "step": 0,
    "phase": "forward",
    "op": "relu_",
    "module": "act",
    "file": "model.py",
    "line": 12,
    "function": "forward",
    "code": "x.relu_()",
    "saved_by": {"module": "gate", "op": "sigmoid", "file": "model.py", "line": 11},
    "context_start": 0,
    "context": [],
    "other_writes": [],
}


def old_run(path: Path, schema: str, rows: dict[str, list[tuple[Any, ...]]]) -> Path:
    """A run directory holding `schema` and `rows`, with META, closed as gradtrace closed it."""
    path.mkdir()
    db = sqlite3.connect(path / DATABASE)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(schema)
    db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in META.items()])
    for table, values in rows.items():
        marks = ", ".join("?" * len(values[0]))
        db.executemany(f"INSERT INTO {table} VALUES ({marks})", values)
    db.commit()
    db.close()
    return path


def files(path: Path) -> dict[str, object]:
    """What a run directory holds: its files but SQLite's own -wal and -shm (a reader may
    create them, empty), the database's bytes and its schema and rows as SQLite reads them."""
    database = path / DATABASE
    db = sqlite3.connect(database)
    try:
        tables = [
            name
            for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        contents = {name: db.execute(f"SELECT * FROM {name}").fetchall() for name in tables}
        schema = db.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    finally:
        db.close()
    return {
        "files": sorted(child.name for child in path.iterdir() if child.suffix == ".sqlite"),
        "database": database.read_bytes(),
        "schema": schema,
        "contents": contents,
    }


def report_json(run: Path) -> dict[str, Any]:
    """`gradtrace report --json`, checking that reading left the run directory as it was."""
    before = files(run)
    done = gradtrace("report", "--json", str(run), cwd=run.parent)
    assert done.returncode == 0, done.stderr
    assert files(run) == before
    return json.loads(done.stdout)


def test_a_run_of_the_first_format_1_opens(tmp_path: Path) -> None:
    run = old_run(
        tmp_path / "first",
        FIRST_FORMAT_1,
        {
            "steps": [(0, 1_700_000_001_000_000_000)],
            "write_counts": [(0, "act", "relu_", "forward", 3), (1, "act", "relu_", "forward", 2)],
            "findings": [(1, "inplace-saved-tensor", 0, 2, json.dumps(FINDING))],
        },
    )
    report = report_json(run)
    assert report["format"] == 1
    assert (report["run"]["status"], report["run"]["steps"], report["run"]["writes"]) == (
        "failed",
        1,
        5,
    )
    [finding] = report["findings"]
    assert (finding["kind"], finding["line"], finding["count"]) == ("inplace-saved-tensor", 12, 2)
    assert report["grad_stats"]["params"] == {} and report["probe_failures"] == []
    before = files(run)
    terminal = gradtrace("report", str(run), cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert terminal.returncode == 0, terminal.stderr
    assert "model.py:12" in terminal.stdout
    listed = gradtrace("ls", str(tmp_path), cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert listed.returncode == 0, listed.stderr
    assert "first" in listed.stdout and "unreadable" not in listed.stdout
    assert files(run) == before


def test_no_room_for_the_private_copy_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = old_run(tmp_path / "first", FIRST_FORMAT_1, {"steps": [(0, 1_700_000_001_000_000_000)]})

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/gradtrace-x")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", full_disk)
    with pytest.raises(GradtraceError, match=r"No space left on device.*TMPDIR") as raised:
        gt.load_run(run)
    assert "\n" not in str(raised.value)


def test_a_format_1_run_from_before_update_norms_opens(tmp_path: Path) -> None:
    run = old_run(
        tmp_path / "grads",
        GRADIENTS_FORMAT_1,
        {
            "steps": [(0, 1), (1, 2)],
            "scalars": [(0, "loss", 2.5), (1, "loss", 1.5)],
            "param_stats": [
                (0, "SGD.step", "fc.weight", "fc", 4, 0.5, 2.0, 0.0, 0),
                (1, "SGD.step", "fc.weight", "fc", 4, None, 2.0, 0.25, 0),
            ],
            "missing_grads": [(1, "SGD.step", "head.bias", "head")],
            "graph_cuts": [(1, "head")],
            "module_sites": [("fc", None)],
        },
    )
    fc = report_json(run)["grad_stats"]["params"]["fc.weight"]
    assert fc["grad_norm"] == [[0, 0.5], [1, "nan"]]
    assert fc["zero_fraction"] == [[0, 0.0], [1, 0.25]]
    assert fc["update_ratio"] == []
    first, second = gt.load_run(run).grad_steps
    assert math.isnan(first.params[0].update_norm)
    assert (second.missing, second.cut, second.clips) == ((("head.bias", "head"),), ("head",), ())


def test_a_run_of_the_last_format_1_keeps_its_update_norms(tmp_path: Path) -> None:
    """The last gradtrace of format 1 wrote today's tables: the migration keeps their rows."""
    writer = RunWriter(tmp_path / "late")
    writer.write_grad_stats(
        StepGradStats(
            step=0,
            optimizer="SGD.step",
            params=(ParamStat("fc.weight", "fc", 4, 0.5, 2.0, 0.0, 0, 0.01),),
            missing=(),
            nonfinite_outputs=(),
            cut=(),
            new_sites=(),
            clips=(ClipCall(3.0, 1.0, 2.0),),
            dead_units=(("act", 3, 8),),
        )
    )
    writer.write_step(0, [], finished=True)
    writer.set_meta(**META)
    writer.close()
    grads = report_json(tmp_path / "late")["grad_stats"]
    assert grads["params"]["fc.weight"]["update_ratio"] == [[0, 0.005]]
    assert grads["global_grad_norm_before_clip"] == [[0, 3.0]]
    assert grads["dead_units"] == {"act": [[0, 3 / 8]]}


def test_every_older_format_has_a_migration() -> None:
    assert sorted(MIGRATIONS) == list(range(1, FORMAT_VERSION))


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("DROP TABLE grad_clips", "no such table: grad_clips"),
        ("UPDATE meta SET value = '0' WHERE key = 'format'", "a run format no gradtrace wrote"),
    ],
)
def test_a_current_run_is_not_probed_for_what_it_lacks(
    tmp_path: Path, change: str, why: str
) -> None:
    """From format 2 on the version alone says what a run holds: a run of the current
    format without one of its tables is damaged, and refused in one line."""
    writer = RunWriter(tmp_path / "run")
    writer.set_meta(status="ok")
    writer.close()
    db = sqlite3.connect(tmp_path / "run" / DATABASE)
    db.execute(change)
    db.commit()
    db.close()
    done = gradtrace("report", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "not a readable gradtrace run" in done.stderr
    assert why in done.stderr
