"""The stable JSON document `gradtrace report --json` prints (documented in README)."""

from __future__ import annotations

from typing import Any

from gradtrace.store.format import FORMAT_VERSION
from gradtrace.store.reader import Run

REPORT_FORMAT = FORMAT_VERSION


def render_json(run: Run) -> dict[str, Any]:
    """Findings first-class, run facts alongside; plain JSON types only."""
    meta = run.meta
    return {
        "format": REPORT_FORMAT,
        "run": {
            "path": str(run.path.resolve()),
            "status": run.status,
            "exit_code": meta.get("exit_code"),
            "argv": meta.get("argv"),
            "level": meta.get("level"),
            "torch": meta.get("torch"),
            "python": meta.get("python"),
            "cuda_device": meta.get("cuda_device"),
            "started_ns": meta.get("started_ns"),
            "ended_ns": meta.get("ended_ns"),
            "exception": meta.get("exception"),
            "steps": run.steps,
            "writes": run.writes,
        },
        "findings": [
            {**stored.finding.to_dict(), "count": stored.count} for stored in run.findings
        ],
        "writes": [
            {"owner": owner, "op": op, "phase": phase, "count": count}
            for owner, op, phase, count in run.write_counts
        ],
    }
