"""`trace.json` in the Chrome trace event format (opens in ui.perfetto.dev, chrome://tracing).

From the store alone. On a track of its own: one span per recorded step (the iteration that
ended with that optimizer step, timed by the steps table), a counter of in-place writes per
owner, and findings as global instant markers. For the steps chosen with `--trace-steps`,
one track per thread that ran them: forward and backward spans per module call (nested by
module), optimizer step spans, and an instant for every in-place write, marked legal or
finding. Spans come from light hooks (see probes/timeline.py) and can overlap a little where
the Chrome format needs proper nesting; each span is clipped into the one around it.

The step track stays small on any run length: past MAX_STEP_SPANS recorded steps,
consecutive steps share one span ("steps 1000–1019") and one counter of their mean writes
per step, so a run of any length gives at most MAX_STEP_SPANS of each.

Pure: a `Report` in, a JSON-ready dict out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gradtrace.analysis.report import Report
from gradtrace.errors import GradtraceError
from gradtrace.events import BACKWARD, Span, TracedWrite
from gradtrace.store.reader import Run, StoredFinding

TRACE_FILE = "trace.json"
PID = 1
# Not a real thread: native thread ids are never 0.
STEPS_TID = 0

# Spans (and write counters) on the step track at most; longer runs group their steps.
MAX_STEP_SPANS = 1000

# (op, module, file, line) of a culprit write -> the finding's kind.
Culprits = dict[tuple[str, str, str, int], str]


def render_trace(report: Report) -> dict[str, Any]:
    """The trace as a JSON object (`traceEvents` plus metadata); times in µs from run start."""
    run, findings = report.run, report.findings
    ends = sorted(run.step_end_ns.items())
    started = run.meta.get("started_ns")
    origin = started if isinstance(started, int) else (ends[0][1] if ends else 0)

    def us(t_ns: int) -> float:
        # Whole nanoseconds: a span's ts + dur is exact in the viewer's own integer units.
        return round((t_ns - origin) / 1000, 3)

    argv = " ".join(run.meta.get("argv") or [str(run.path)])
    events: list[dict[str, Any]] = [
        _meta("process_name", 0, {"name": f"gradtrace {argv}"}),
        _meta("thread_name", STEPS_TID, {"name": "optimizer steps"}),
    ]
    events += [_meta("thread_name", tid, {"name": name}) for tid, name in _threads(run).items()]
    timed = [
        *_step_track(run, ends, origin, us, findings),
        *_span_events(run.spans, us),
        *_write_events(run.traced_writes, us, _culprits(findings)),
    ]
    # Parents first among spans starting together (the sort is stable; spans come nested).
    timed.sort(key=lambda event: (event["ts"], -event.get("dur", 0.0)))
    traced = sorted({span.step for span in run.spans} | {w.step for w in run.traced_writes})
    return {
        "traceEvents": events + timed,
        "displayTimeUnit": "ms",
        "otherData": {
            "run": str(run.path),
            "status": run.status,
            "steps": run.steps,
            "traced_steps": traced,
            "steps_per_span": _group_size(len(ends)),
        },
    }


def _step_track(
    run: Run,
    ends: list[tuple[int, int]],
    origin: int,
    us: Callable[[int], float],
    findings: Sequence[StoredFinding],
) -> list[dict[str, Any]]:
    """Step spans, write counters at each step's end and finding markers at its start; past
    MAX_STEP_SPANS steps, one span and one counter per group of consecutive steps."""
    events: list[dict[str, Any]] = []
    step_start: dict[int, float] = {}
    step_end: dict[int, float] = {}
    previous = origin
    for step, end_ns in ends:
        begin = min(previous, end_ns)
        step_start[step], step_end[step] = us(begin), us(end_ns)
        previous = end_ns
    last = us(previous)
    size = _group_size(len(ends))
    groups = [[step for step, _ in ends[i : i + size]] for i in range(0, len(ends), size)]
    for group in groups:
        first, final = group[0], group[-1]
        events.append(
            {
                "name": f"step {first}" if size == 1 else f"steps {first}–{final}",
                "cat": "step",
                "ph": "X",
                "ts": step_start[first],
                "dur": round(step_end[final] - step_start[first], 3),
                "pid": PID,
                "tid": STEPS_TID,
                "args": {"step": first} if size == 1 else {"first": first, "last": final},
            }
        )
    per_step: dict[int, dict[str, int]] = {}
    for step, owner, _op, _phase, count in run.step_write_counts:
        owners = per_step.setdefault(step, {})
        owners[owner] = owners.get(owner, 0) + count
    # A group's counter: its mean writes per step, at the group's end. The unfinished tail
    # (a step with writes but no end) keeps a counter of its own.
    group_of = {step: index for index, group in enumerate(groups) for step in group}
    counted: dict[int, dict[str, int]] = {}
    for step in sorted(per_step):
        owners = counted.setdefault(group_of.get(step, len(groups) + step), {})
        for owner, count in per_step[step].items():
            owners[owner] = owners.get(owner, 0) + count
    for key, owners in counted.items():
        in_group = key < len(groups)
        ts = step_end[groups[key][-1]] if in_group else last
        steps = len(groups[key]) if in_group else 1
        events.append(
            {
                "name": "in-place writes",
                "cat": "writes",
                "ph": "C",
                "ts": ts,
                "pid": PID,
                "tid": STEPS_TID,
                "args": {owner: _mean(total, steps) for owner, total in owners.items()},
            }
        )
    for stored in findings:
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
    return events


def _group_size(steps: int) -> int:
    """Steps per span on the step track: 1 up to MAX_STEP_SPANS steps."""
    return max(1, -(-steps // MAX_STEP_SPANS))


def _mean(total: int, steps: int) -> int | float:
    """Writes per step: a whole number when it is one (always, for single steps)."""
    return total // steps if total % steps == 0 else round(total / steps, 3)


def _threads(run: Run) -> dict[int, str]:
    """Every thread with spans or writes, by its recorded name."""
    seen = {span.thread for span in run.spans} | {w.thread for w in run.traced_writes}
    return {tid: run.threads.get(tid, f"thread {tid}") for tid in sorted(seen)}


def _span_events(spans: list[Span], us: Callable[[int], float]) -> list[dict[str, Any]]:
    by_thread: dict[int, list[Span]] = {}
    for span in spans:
        by_thread.setdefault(span.thread, []).append(span)
    events = []
    for thread_spans in by_thread.values():
        for span, start, end in nested(thread_spans):
            name = f"{span.name} (backward)" if span.kind == BACKWARD else span.name
            events.append(
                {
                    "name": name,
                    "cat": span.kind,
                    "ph": "X",
                    "ts": us(start),
                    "dur": round(us(end) - us(start), 3),
                    "pid": PID,
                    "tid": span.thread,
                    "args": {"step": span.step, "phase": span.kind, "name": span.name},
                }
            )
    return events


def nested(spans: list[Span]) -> list[tuple[Span, int, int]]:
    """One thread's spans as (span, start_ns, end_ns), outer before inner, properly nested.

    Spans are ordered by start, longer first, shallower module first; a span that outlasts
    the span around it is clipped to end with it, as the Chrome format requires.
    """
    ordered = sorted(spans, key=lambda s: (s.start_ns, -s.end_ns, s.depth))
    enclosing: list[int] = []  # end of each span the next one may lie in, innermost last
    result = []
    for span in ordered:
        # The wall clock may step back (NTP) within a span: never a negative duration.
        start, end = span.start_ns, max(span.start_ns, span.end_ns)
        while enclosing and enclosing[-1] <= start:
            enclosing.pop()
        if enclosing:
            end = min(end, enclosing[-1])
        result.append((span, start, end))
        enclosing.append(end)
    return result


def _culprits(findings: Sequence[StoredFinding]) -> Culprits:
    return {
        (f.op, f.module, f.file, f.line): f.kind
        for f in (stored.finding for stored in findings)
        if f.op is not None and f.module is not None and f.file is not None and f.line is not None
    }


def _write_events(
    writes: list[TracedWrite], us: Callable[[int], float], culprits: Culprits
) -> list[dict[str, Any]]:
    """One thread-scoped instant per write; "finding" when a finding names its op and line."""
    events = []
    for write in writes:
        source = write.source
        kind = (
            None
            if source is None
            else culprits.get((write.op, write.owner, source.file, source.line))
        )
        events.append(
            {
                "name": write.op,
                "cat": "write",
                "ph": "i",
                "s": "t",
                "ts": us(write.t_ns),
                "pid": PID,
                "tid": write.thread,
                "args": {
                    "op": write.op,
                    "module": write.owner,
                    "phase": write.phase,
                    "at": None if source is None else f"{source.file}:{source.line}",
                    "code": None if source is None else source.code,
                    "step": write.step,
                    "verdict": "legal" if kind is None else "finding",
                    "finding": kind,
                },
            }
        )
    return events


def write_trace(report: Report, out: Path) -> Path:
    try:
        out.write_text(json.dumps(render_trace(report)), encoding="utf-8")
    except OSError as error:
        raise GradtraceError(f"Cannot write the trace to '{out}': {error.strerror}.") from None
    return out


def _meta(name: str, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "ts": 0, "pid": PID, "tid": tid, "args": args}
