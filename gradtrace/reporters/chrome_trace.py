"""`trace.json` in the Chrome trace event format (opens in ui.perfetto.dev, chrome://tracing).

From the store alone: one span per recorded step (the iteration that ended with that
optimizer step, timed by the steps table), a counter track of in-place writes per owner,
and findings as global instant markers. Forward/backward spans per module would need a
timing probe the store does not have yet. Pure: a `Run` in, a JSON-ready dict out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gradtrace.analysis.findings import run_findings
from gradtrace.errors import GradtraceError
from gradtrace.store.reader import Run

TRACE_FILE = "trace.json"
PID = 1
STEPS_TID = 1


def render_trace(run: Run) -> dict[str, Any]:
    """The trace as a JSON object (`traceEvents` plus metadata); times in µs from run start."""
    ends = sorted(run.step_end_ns.items())
    started = run.meta.get("started_ns")
    origin = started if isinstance(started, int) else (ends[0][1] if ends else 0)

    def us(t_ns: int) -> float:
        return (t_ns - origin) / 1000

    argv = " ".join(run.meta.get("argv") or [str(run.path)])
    events: list[dict[str, Any]] = [
        _meta("process_name", 0, {"name": f"gradtrace {argv}"}),
        _meta("thread_name", STEPS_TID, {"name": "optimizer steps"}),
    ]
    step_start: dict[int, float] = {}
    step_end: dict[int, float] = {}
    previous = origin
    for step, end_ns in ends:
        begin = min(previous, end_ns)
        step_start[step], step_end[step] = us(begin), us(end_ns)
        events.append(
            {
                "name": f"step {step}",
                "cat": "step",
                "ph": "X",
                "ts": us(begin),
                # From the same rounded µs as ts, so ts + dur is exactly the next span's ts.
                "dur": max(0.0, us(end_ns) - us(begin)),
                "pid": PID,
                "tid": STEPS_TID,
                "args": {"step": step},
            }
        )
        previous = end_ns
    last = us(previous)
    per_step: dict[int, dict[str, int]] = {}
    for step, owner, _op, _phase, count in run.step_write_counts:
        owners = per_step.setdefault(step, {})
        owners[owner] = owners.get(owner, 0) + count
    for step in sorted(per_step):
        events.append(
            {
                "name": "in-place writes",
                "cat": "writes",
                "ph": "C",
                "ts": step_end.get(step, last),
                "pid": PID,
                "tid": STEPS_TID,
                "args": per_step[step],
            }
        )
    for stored in run_findings(run):
        finding = stored.finding
        where = f"{finding.file}:{finding.line}" if finding.file else None
        events.append(
            {
                "name": f"finding: {finding.kind}",
                "cat": "finding",
                "ph": "i",
                "s": "g",
                "ts": step_start.get(finding.step, last),
                "pid": PID,
                "tid": STEPS_TID,
                "args": {
                    "message": finding.message,
                    "module": finding.module,
                    "at": where,
                    "step": finding.step,
                    "count": stored.count,
                    "hint": finding.hint,
                },
            }
        )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"run": str(run.path), "status": run.status, "steps": run.steps},
    }


def write_trace(run: Run, out: Path) -> Path:
    try:
        out.write_text(json.dumps(render_trace(run)), encoding="utf-8")
    except OSError as error:
        raise GradtraceError(f"Cannot write the trace to '{out}': {error.strerror}.") from None
    return out


def _meta(name: str, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "ts": 0, "pid": PID, "tid": tid, "args": args}
