"""The run directory: round trip, deduplication, and refusing what is not ours."""

from __future__ import annotations

import json
import math
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from events_factory import evidence, write

from gradtrace.analysis.culprits import diagnose
from gradtrace.errors import GradtraceError
from gradtrace.store import RunWriter, load_run
from gradtrace.store.format import DATABASE, FORMAT_VERSION


def finished_run(path: Path) -> Path:
    writer = RunWriter(path)
    finding = diagnose(evidence((write(),)))
    assert finding is not None
    assert writer.add_finding(finding)
    assert not writer.add_finding(finding)
    writer.write_step(0, Counter({("encoder.act", "relu_", "forward"): 3}).items(), finished=True)
    writer.write_step(1, Counter({("encoder.act", "relu_", "forward"): 2}).items(), finished=False)
    writer.set_meta(status="failed", exit_code=1, argv=["train.py"])
    writer.close()
    return path


def test_round_trip(tmp_path: Path) -> None:
    run = load_run(finished_run(tmp_path / "run"))
    assert run.status == "failed"
    assert run.steps == 1
    assert run.writes == 5
    assert run.write_counts == [("encoder.act", "relu_", "forward", 5)]
    [stored] = run.findings
    assert stored.count == 2
    assert stored.finding == diagnose(evidence((write(),)))


def test_every_stored_record_comes_back_field_for_field(tmp_path: Path) -> None:
    """The INSERTs and SELECTs derived from the table declarations keep every field of every
    record type, NaN and Inf and missing sources included."""
    from gradtrace.events import (
        HISTOGRAM_EDGES,
        ClipCall,
        GradHistogram,
        ParamStat,
        ProbeFailure,
        RankNorms,
        SourceLine,
        Span,
        StepGradStats,
        TracedWrite,
    )

    stats = StepGradStats(
        step=3,
        optimizer="AdamW.step",
        params=(
            ParamStat("fc.weight", "fc", 12, 0.5, 2.0, 0.25, 1, 0.125),
            ParamStat("fc.bias", "fc", 3, math.nan, math.inf, 0.0, 0),
        ),
        missing=(("head.weight", "head"),),
        nonfinite_outputs=("fc", "act"),
        cut=("head",),
        new_sites=(),
        output_grad_norms=(("act", 0.75), ("drop", math.nan)),
        clips=(ClipCall(3.0, 1.0, math.inf),),
        dead_units=(("act", 2, 8),),
    )
    spans = [
        Span(3, "forward", "fc", 11, 1, 100, 200),
        Span(3, "optimizer", "AdamW.step", 11, 0, 300, 400),
    ]
    writes = [
        TracedWrite(3, 150, 11, "relu_", "act", "forward", SourceLine("m.py", 4, "f", "x.relu_()")),
        TracedWrite(3, 350, 12, "add_", "AdamW.step", "optimizer", None),
    ]
    histogram = GradHistogram(3, "fc.weight", tuple(range(len(HISTOGRAM_EDGES) + 1)))
    norms = RankNorms(3, "AdamW.step", ("fc.weight",), ((0.5,), (0.25,)), ((2.0,), (-1.0,)))
    failure = ProbeFailure("write log", 3, "ValueError", "boom", "gradtrace/x.py:1 in f")
    writer = RunWriter(tmp_path / "run")
    writer.write_grad_stats(stats)
    writer.write_timeline(spans, writes, {11: "MainThread", 12: "autograd"})
    writer.write_histograms([histogram])
    writer.write_rank_norms(norms)
    writer.write_scalars(3, {"loss": 1.5, "scale": math.nan})
    writer.add_probe_failure(failure)
    writer.write_step(3, [], finished=True)
    writer.close()
    run = load_run(tmp_path / "run")
    [back] = run.grad_steps
    assert repr(back) == repr(stats)  # repr: NaN compares unequal to itself
    assert (run.spans, run.traced_writes) == (spans, writes)
    assert run.threads == {11: "MainThread", 12: "autograd"}
    assert (run.grad_histograms, run.rank_norms, run.probe_failures) == (
        [histogram],
        [norms],
        [failure],
    )
    assert run.scalars["loss"] == [(3, 1.5)] and math.isnan(run.scalars["scale"][0][1])


def test_a_field_of_a_record_type_is_a_column_of_its_table() -> None:
    """What adding a field to a stored record type does to its table, from the declaration."""
    from dataclasses import dataclass

    from gradtrace.store.format import STEP, record_table

    @dataclass(frozen=True)
    class Stat:
        name: str
        numel: int
        foo_norm: float
        note: str | None
        counts: tuple[int, ...]

    table = record_table("stats", Stat, keys=(STEP,), rename={"name": "param"})
    assert [(c.name, c.type, c.nullable, c.json) for c in table.columns] == [
        ("step", "INTEGER", False, False),
        ("param", "TEXT", False, False),
        ("numel", "INTEGER", False, False),
        ("foo_norm", "REAL", True, False),
        ("note", "TEXT", True, False),
        ("counts", "TEXT", False, True),
    ]
    db = sqlite3.connect(":memory:")
    db.executescript(table.create)
    db.executemany(table.insert, table.rows([Stat("w", 3, math.nan, None, (1, 2))], 7))
    assert db.execute(table.select).fetchall() == [(7, "w", 3, None, None, "[1, 2]")]

    @dataclass(frozen=True)
    class Unstorable:
        options: dict[str, int]

    with pytest.raises(TypeError, match="no column type for a field 'options'"):
        record_table("unstorable", Unstorable)


def test_unclosed_run_reads_as_killed(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path / "run")
    writer.set_meta(status="running")
    assert load_run(tmp_path / "run").status == "killed"
    writer.close()


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    finished_run(tmp_path / "run")
    with pytest.raises(GradtraceError, match="already exists"):
        RunWriter(tmp_path / "run")


def test_foreign_directory(tmp_path: Path) -> None:
    with pytest.raises(GradtraceError, match=r"No gradtrace run at .* \(no run.sqlite\)"):
        load_run(tmp_path)


def test_corrupt_database(tmp_path: Path) -> None:
    (tmp_path / DATABASE).write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(GradtraceError, match="not a readable gradtrace run"):
        load_run(tmp_path)


def test_other_programs_sqlite(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DATABASE)
    db.execute("CREATE TABLE songs (title TEXT)")
    db.commit()
    db.close()
    with pytest.raises(GradtraceError, match="not a readable gradtrace run"):
        load_run(tmp_path)


def test_newer_format_is_refused_with_advice(tmp_path: Path) -> None:
    path = finished_run(tmp_path / "run")
    db = sqlite3.connect(path / DATABASE)
    db.execute("UPDATE meta SET value = ? WHERE key = 'format'", (json.dumps(FORMAT_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(GradtraceError, match="Upgrade gradtrace"):
        load_run(path)


def test_store_jobs_run_in_order_off_the_caller_thread_and_raise_on_it() -> None:
    import threading

    from gradtrace.store.jobs import MAX_IN_FLIGHT, StoreJobs

    ran: list[tuple[int, str]] = []
    jobs = StoreJobs()
    for i in range(MAX_IN_FLIGHT * 3):
        jobs.submit(lambda i=i: ran.append((i, threading.current_thread().name)))
    jobs.wait()
    assert [i for i, _ in ran] == list(range(MAX_IN_FLIGHT * 3))
    assert all(name.startswith("gradtrace-store") for _, name in ran)

    def broken() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    jobs.submit(broken)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        jobs.close()


def test_a_session_stores_its_steps_on_the_store_thread(tmp_path: Path, monkeypatch) -> None:
    import threading

    import torch

    from gradtrace.session import Session

    threads: set[str] = set()
    write_step = RunWriter.write_step

    def noting(self: RunWriter, *args, **kwargs) -> None:
        threads.add(threading.current_thread().name)
        write_step(self, *args, **kwargs)

    monkeypatch.setattr(RunWriter, "write_step", noting)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Session(tmp_path / "run", model=model):
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()
    assert {name.split("_")[0] for name in threads} == {"gradtrace-store"}
    run = load_run(tmp_path / "run")
    assert run.steps == 3 and [s.step for s in run.grad_steps] == [0, 1, 2]


def test_a_session_closed_at_interpreter_exit_stores_its_last_step(tmp_path: Path) -> None:
    """The interpreter stops the store thread before atexit handlers run (hf.py closes there)."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import atexit, sys, torch
            from gradtrace.session import Session
            session = Session(sys.argv[1]).start()
            atexit.register(session.close)
            model = torch.nn.Linear(4, 1)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(3):
                optimizer.zero_grad()
                model(torch.randn(2, 4)).sum().backward()
                optimizer.step()
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    run = load_run(tmp_path / "run")
    assert run.status == "ok" and run.steps == 3
    assert [s.step for s in run.grad_steps] == [0, 1, 2]
