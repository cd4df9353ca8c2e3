"""trace.json: valid Chrome trace events from a stored run."""

from __future__ import annotations

import functools
import itertools
import json
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from cli_process import gradtrace
from events_factory import evidence, source, write
from trace_format import check_trace_format
from trace_format import spans as spans_of

from gradtrace.analysis.culprits import diagnose
from gradtrace.analysis.report import build_report
from gradtrace.events import Span, TracedWrite
from gradtrace.reporters.chrome_trace import MAX_STEP_SPANS, STEPS_TID, render_trace
from gradtrace.store.format import DATABASE
from gradtrace.store.reader import Run, StoredFinding, load_run
from gradtrace.store.writer import RunWriter


def sample_run() -> Run:
    finding = diagnose(evidence((write("relu_"),)))
    assert finding is not None
    second = 1_000_000_000
    return Run(
        path=Path("/runs/demo"),
        meta={"status": "ok", "argv": ["train.py"], "started_ns": 10 * second},
        findings=[StoredFinding(finding, 2)],
        steps=3,
        step_write_counts=[
            (0, "encoder.act", "relu_", "forward", 2),
            (0, "AdamW.step", "lerp_", "optimizer", 4),
            (1, "AdamW.step", "lerp_", "optimizer", 4),
            (2, "AdamW.step", "lerp_", "optimizer", 4),
            (3, "encoder.act", "relu_", "forward", 1),  # the unfinished tail
        ],
        step_end_ns={0: 11 * second, 1: 13 * second, 2: 14 * second},
    )


def test_steps_become_spans_with_write_counters_and_finding_markers() -> None:
    document = render_trace(build_report(sample_run()))
    check_trace_format(document)
    events = document["traceEvents"]
    spans = [(e["name"], e["ts"], e["dur"]) for e in events if e["ph"] == "X"]
    assert spans == [
        ("step 0", 0.0, 1e6),
        ("step 1", 1e6, 2e6),
        ("step 2", 3e6, 1e6),
    ]
    counters = [(e["ts"], e["args"]) for e in events if e["ph"] == "C"]
    assert counters[0] == (1e6, {"encoder.act": 2, "AdamW.step": 4})
    assert counters[-1] == (4e6, {"encoder.act": 1})  # the tail, at the last step's end
    [marker] = [e for e in events if e["ph"] == "i"]
    assert marker["name"] == "finding: inplace-write"
    assert marker["ts"] == 0.0  # the start of step 0, where it happened
    assert marker["args"]["at"] == "/work/model.py:42"
    assert marker["args"]["count"] == 2


def test_cli_writes_trace_json_into_the_run_directory(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path / "r")
    writer.set_meta(status="running", started_ns=1, argv=["t.py"])
    for step in range(3):
        writer.write_step(step, [(("SGD.step", "add_", "optimizer"), 2)], finished=True)
    writer.close()
    result = subprocess.run(
        [sys.executable, "-m", "gradtrace", "trace", "r"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "r" / "trace.json").read_text())
    check_trace_format(document)
    assert [e["name"] for e in document["traceEvents"] if e["ph"] == "X"] == [
        "step 0",
        "step 1",
        "step 2",
    ]
    assert document["otherData"]["status"] == "killed"


def test_spans_are_clipped_into_the_span_around_them_and_writes_say_legal_or_finding() -> None:
    us = 1000
    origin = 10_000_000_000
    span = functools.partial(Span, 0, "backward", thread=7)
    run = replace(
        sample_run(),
        spans=[
            span("encoder", depth=0, start_ns=origin + 10 * us, end_ns=origin + 50 * us),
            # A child the hooks saw start before its parent: ordered first, parent clipped.
            span("encoder.act", depth=1, start_ns=origin + 9 * us, end_ns=origin + 20 * us),
            span("encoder.fc", depth=1, start_ns=origin + 30 * us, end_ns=origin + 60 * us),
        ],
        traced_writes=[
            TracedWrite(0, origin + 5 * us, 7, "relu_", "encoder.act", "forward", source(42, "")),
            TracedWrite(0, origin + 6 * us, 7, "add_", "encoder", "forward", source(43, "")),
        ],
        threads={7: "MainThread"},
    )
    document = render_trace(build_report(run))
    check_trace_format(document)
    assert [(e["name"], e["ts"], e["dur"]) for e in spans_of(document, "backward")] == [
        ("encoder.act (backward)", 9.0, 11.0),
        ("encoder (backward)", 10.0, 10.0),  # clipped: it cannot outlive encoder.act
        ("encoder.fc (backward)", 30.0, 30.0),
    ]
    marks = [e for e in document["traceEvents"] if e.get("cat") == "write"]
    assert [(e["name"], e["tid"], e["args"]["verdict"], e["args"]["at"]) for e in marks] == [
        ("relu_", 7, "finding", "/work/model.py:42"),
        ("add_", 7, "legal", "/work/model.py:43"),
    ]
    names = {e["tid"]: e["args"]["name"] for e in document["traceEvents"] if e["ph"] == "M"}
    assert names[7] == "MainThread"


def test_a_run_recorded_before_timelines_still_opens(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path / "old")
    # Run format 1, before the timeline tables.
    writer.set_meta(format=1, status="ok", started_ns=1, argv=["t.py"])
    writer.write_step(0, [], finished=True)
    writer.close()
    with sqlite3.connect(tmp_path / "old" / DATABASE) as db:
        db.executescript("DROP TABLE spans; DROP TABLE traced_writes; DROP TABLE threads;")
    db.close()
    run = load_run(tmp_path / "old")
    assert (run.spans, run.traced_writes, run.threads) == ([], [], {})
    check_trace_format(render_trace(build_report(run)))


SCRIPT = """\
import torch
from torch import nn


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.fc(x)
        h += 1  # legal: nothing saved h
        gate = torch.sigmoid(h)
        return x * self.act(gate)  # BUG_LINE when BUG_STEP is reached


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 8), Gated(), nn.Linear(8, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(STEPS):
    model[1].act.inplace = step == BUG_STEP
    loss = model(torch.randn(4, 8)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
"""


def run_script(tmp_path: Path, *options: str, steps: int, bug_step: int = -1) -> dict:
    tmp_path.mkdir(exist_ok=True)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.replace("STEPS", str(steps)).replace("BUG_STEP", str(bug_step)))
    result = gradtrace("run", "--out", "r", *options, "train.py", cwd=tmp_path)
    assert result.returncode == (1 if bug_step >= 0 else 0), result.stderr
    document = json.loads((tmp_path / "r" / "trace.json").read_text())
    check_trace_format(document)
    return document


def test_run_writes_write_instants_with_their_line_legal_or_finding(tmp_path: Path) -> None:
    document = run_script(tmp_path, steps=3, bug_step=1)
    script = str(tmp_path / "train.py")
    lines = SCRIPT.splitlines()
    legal_line = next(n for n, text in enumerate(lines, 1) if "h += 1" in text)
    bug_line = next(n for n, text in enumerate(lines, 1) if "BUG_LINE" in text)
    marks = {
        (e["args"]["step"], e["name"], e["args"]["module"], e["args"]["at"], e["args"]["verdict"])
        for e in document["traceEvents"]
        if e.get("cat") == "write" and e["args"]["at"] and e["args"]["at"].startswith(script)
    }
    assert (0, "add_", "1", f"{script}:{legal_line}", "legal") in marks
    assert (1, "add_", "1", f"{script}:{legal_line}", "legal") in marks
    assert (1, "relu_", "1.act", f"{script}:{bug_line}", "finding") in marks
    assert not any(step == 0 and op == "relu_" for step, op, *_ in marks)
    [main] = [
        e
        for e in document["traceEvents"]
        if e["ph"] == "M" and e["tid"] != STEPS_TID and e["name"] == "thread_name"
    ]
    assert main["args"]["name"] == "MainThread"
    assert all(e["tid"] == main["tid"] for e in document["traceEvents"] if e.get("cat") == "write")


def test_trace_steps_choose_the_steps_with_spans_and_bound_the_size(tmp_path: Path) -> None:
    chosen = run_script(tmp_path / "chosen", "--trace-steps", "1,4-5", steps=12)
    assert chosen["otherData"]["traced_steps"] == [1, 4, 5]
    for cat in ("forward", "backward", "optimizer"):
        assert {e["args"]["step"] for e in spans_of(chosen, cat)} == {1, 4, 5}, cat
    assert {e["args"]["step"] for e in chosen["traceEvents"] if e.get("cat") == "write"} == {
        1,
        4,
        5,
    }
    default = run_script(tmp_path / "default", steps=12)
    assert default["otherData"]["traced_steps"] == [0, 1, 2]
    none = run_script(tmp_path / "none", "--trace-steps", "none", steps=12)
    assert none["otherData"]["traced_steps"] == []
    assert [e["cat"] for e in none["traceEvents"] if e["ph"] == "X"] == ["step"] * 12
    sizes = [len(json.dumps(d)) for d in (none, chosen, default)]
    assert sizes == sorted(sizes)


def test_bad_trace_steps_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("")
    result = gradtrace("run", "--trace-steps", "3-1", "train.py", cwd=tmp_path)
    assert result.returncode == 2
    assert "Bad trace steps '3-1'" in result.stderr
    assert not (tmp_path / "gradtrace-runs").exists()


def long_run(steps: int) -> Run:
    """A run of `steps` tiny steps, 1 ms apart, each with the same in-place writes."""
    ms = 1_000_000
    counts = [(step, "AdamW.step", "lerp_", "optimizer", 4) for step in range(steps)]
    counts += [(step, "encoder.act", "relu_", "forward", 1) for step in range(0, steps, 2)]
    return Run(
        path=Path("/runs/long"),
        meta={"status": "ok", "argv": ["train.py"], "started_ns": 0},
        findings=[],
        steps=steps,
        step_write_counts=counts,
        step_end_ns={step: (step + 1) * ms for step in range(steps)},
    )


def test_the_step_track_stays_bounded_on_a_long_run() -> None:
    document = render_trace(build_report(long_run(20_000)))
    check_trace_format(document)
    size = len(json.dumps(document))
    assert size < 400_000, size  # 2.6 MB with one span and one counter per step
    spans = [e for e in document["traceEvents"] if e["ph"] == "X"]
    counters = [e for e in document["traceEvents"] if e["ph"] == "C"]
    assert len(spans) == len(counters) == MAX_STEP_SPANS
    assert document["otherData"]["steps_per_span"] == 20
    assert spans[0]["name"] == "steps 0–19" and spans[-1]["name"] == "steps 19980–19999"
    assert spans[-1]["args"] == {"first": 19980, "last": 19999}
    assert spans[0]["ts"] == 0.0 and spans[-1]["ts"] + spans[-1]["dur"] == 20_000_000.0
    assert all(a["ts"] + a["dur"] == b["ts"] for a, b in itertools.pairwise(spans))  # no gaps
    # Mean writes per step in each group: every step 4 lerp_, every other step a relu_.
    assert {json.dumps(c["args"], sort_keys=True) for c in counters} == {
        json.dumps({"AdamW.step": 4, "encoder.act": 0.5}, sort_keys=True)
    }
    short = render_trace(build_report(long_run(MAX_STEP_SPANS)))
    assert len([e for e in short["traceEvents"] if e["ph"] == "X"]) == MAX_STEP_SPANS
    assert short["otherData"]["steps_per_span"] == 1
