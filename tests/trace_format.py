"""Checks a document against the Chrome trace event format, as ui.perfetto.dev reads it."""

from __future__ import annotations

import json
import math
from typing import Any

PHASES = {"X", "B", "E", "i", "C", "M"}


def ns(microseconds: float) -> int:
    """The viewer's integer nanoseconds for a JSON time in microseconds."""
    return round(microseconds * 1000)


def check_trace_format(document: dict[str, Any]) -> None:
    """Required keys and phases; per track: monotonic ts, balanced B/E, properly nested X."""
    json.dumps(document, allow_nan=False)
    last_ts: dict[tuple[int, int], int] = {}
    spans_open: dict[tuple[int, int], list[int]] = {}
    begun: dict[tuple[int, int], list[str]] = {}
    for event in document["traceEvents"]:
        assert {"name", "ph", "ts", "pid", "tid"} <= set(event), event
        assert event["ph"] in PHASES, event
        if event["ph"] == "M":
            continue
        track = (event["pid"], event["tid"])
        ts = ns(event["ts"])
        assert ts >= last_ts.get(track, -math.inf), f"ts goes back on a track: {event}"
        last_ts[track] = ts
        if event["ph"] == "X":
            assert event["dur"] >= 0, event
            end = ns(event["ts"] + event["dur"])
            enclosing = spans_open.setdefault(track, [])
            while enclosing and enclosing[-1] <= ts:
                enclosing.pop()
            assert not enclosing or end <= enclosing[-1], f"span outlives its parent: {event}"
            enclosing.append(end)
        elif event["ph"] == "B":
            begun.setdefault(track, []).append(event["name"])
        elif event["ph"] == "E":
            assert begun.get(track), f"E without B: {event}"
            begun[track].pop()
        elif event["ph"] == "i":
            assert event.get("s", "t") in {"g", "p", "t"}, event
        elif event["ph"] == "C":
            assert all(isinstance(v, (int, float)) for v in event["args"].values()), event
    assert not any(begun.values()), "unbalanced B/E"


def spans(document: dict[str, Any], cat: str) -> list[dict[str, Any]]:
    return [e for e in document["traceEvents"] if e["ph"] == "X" and e.get("cat") == cat]


def inside(child: dict[str, Any], parent: dict[str, Any]) -> bool:
    """True if `child` lies within `parent` on the same track."""
    return (
        (child["pid"], child["tid"]) == (parent["pid"], parent["tid"])
        and ns(parent["ts"]) <= ns(child["ts"])
        and ns(child["ts"] + child["dur"]) <= ns(parent["ts"] + parent["dur"])
    )
