"""trace.json: valid Chrome trace events from a stored run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from events_factory import evidence, write

from gradtrace.analysis.culprits import diagnose
from gradtrace.reporters.chrome_trace import render_trace
from gradtrace.store.reader import Run, StoredFinding

PHASES = {"X", "i", "C", "M"}


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


def check_trace_format(document: dict) -> None:
    events = document["traceEvents"]
    last_ts: dict[tuple[int, int], float] = {}
    for event in events:
        assert {"name", "ph", "ts", "pid", "tid"} <= set(event), event
        assert event["ph"] in PHASES
        if event["ph"] == "X":
            assert event["dur"] >= 0
            key = (event["pid"], event["tid"])
            assert event["ts"] >= last_ts.get(key, 0.0), "spans out of order on a track"
            last_ts[key] = event["ts"] + event["dur"]
        if event["ph"] == "i":
            assert event["s"] in {"g", "p", "t"}
    json.dumps(document, allow_nan=False)


def test_steps_become_spans_with_write_counters_and_finding_markers() -> None:
    document = render_trace(sample_run())
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
    from gradtrace.store.writer import RunWriter

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
