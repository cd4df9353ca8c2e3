"""The stable JSON document `gradtrace report --json` prints (documented in docs/run-format.md)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from gradtrace.analysis.grad_health import update_ratio
from gradtrace.analysis.report import Report
from gradtrace.store.reader import Run

# The JSON document's own version, bumped when its fields change; the run format (how the
# run directory stores a run) is versioned apart, in store/format.py.
REPORT_FORMAT = 1


def render_json(report: Report) -> dict[str, Any]:
    """Findings first-class, run facts alongside; plain JSON types only."""
    run = report.run
    meta = run.meta
    return {
        "format": REPORT_FORMAT,
        "run": {
            "path": str(run.path.resolve()),
            "status": run.status,
            "exit_code": meta.get("exit_code"),
            "argv": meta.get("argv"),
            "level": meta.get("level"),
            "core": meta.get("core"),
            "torch": meta.get("torch"),
            "python": meta.get("python"),
            "cuda_device": meta.get("cuda_device"),
            "started_ns": meta.get("started_ns"),
            "ended_ns": meta.get("ended_ns"),
            "exception": meta.get("exception"),
            "notices": meta.get("notices") or [],
            "checkpointed": meta.get("checkpointed") or {},
            "steps": run.steps,
            # "optimizer", "backward" (no optimizer stepped) or null (no step).
            "steps_counted_by": _counted_by(meta.get("steps_counted_by")),
            "writes": run.writes,
            "rank": run.rank,
            "world_size": meta.get("world_size"),
        },
        "ranks": [_rank(rank, meta.get("first_failed_rank")) for rank in run.ranks],
        "probe_failures": [asdict(failure) for failure in run.probe_failures],
        "findings": [
            {**stored.finding.to_dict(), "count": stored.count} for stored in report.findings
        ],
        # Silenced on purpose (an ignore comment, a gradtrace.ignore block): kept, not shown.
        "silenced": [
            {**silenced.stored.finding.to_dict(), "count": silenced.stored.count, "by": silenced.by}
            for silenced in report.silenced
        ],
        "grad_stats": _grad_stats(report),
        "writes": [
            {"owner": owner, "op": op, "phase": phase, "count": count}
            for owner, op, phase, count in run.write_counts
        ],
    }


def _counted_by(value: object) -> str | None:
    """The stored rule, if it is one this gradtrace knows (meta is anyone's JSON)."""
    return value if value in ("optimizer", "backward") else None


def _rank(run: Run, first_failed: int | None) -> dict[str, Any]:
    """One rank of a torchrun job: how it ended (its findings are in `findings`, tagged)."""
    meta = run.meta
    return {
        "rank": run.rank,
        "node": meta.get("node_rank"),
        "host": meta.get("host"),
        "path": str(run.path.resolve()),
        "status": run.status,
        "exit_code": meta.get("exit_code"),
        "exception": meta.get("exception"),
        "ended_ns": meta.get("ended_ns"),
        "steps": run.steps,
        "failed_first": run.rank is not None and run.rank == first_failed,
    }


def _grad_stats(report: Report) -> dict[str, Any]:
    """Per-step norms: global, per module and per parameter. NaN/Inf become strings.

    `update_ratio` lists only the steps where it was recorded (`--update-ratio`); the
    clipping series only the steps where `clip_grad_norm_` was called.
    """
    run, norms, clips = report.run, report.norms, report.clips
    params: dict[str, dict[str, list[list[Any]]]] = {}
    for stats in run.grad_steps:
        for p in stats.params:
            entry = params.setdefault(
                p.name,
                {"grad_norm": [], "param_norm": [], "zero_fraction": [], "update_ratio": []},
            )
            entry["grad_norm"].append([stats.step, _json_number(p.grad_norm)])
            entry["param_norm"].append([stats.step, _json_number(p.param_norm)])
            entry["zero_fraction"].append([stats.step, _json_number(p.zero_fraction)])
            if not math.isnan(p.update_norm):
                entry["update_ratio"].append([stats.step, _json_number(update_ratio(p))])
    return {
        "global_grad_norm": _series(norms.global_grad),
        "global_grad_norm_before_clip": _series((c.step, c.norm_before) for c in clips),
        "clip_max_norm": _series((c.step, c.max_norm) for c in clips),
        "modules": {
            module: {
                "grad_norm": _series(series),
                "param_norm": _series(norms.param.get(module, ())),
                "update_ratio": _series(norms.update_ratio.get(module, ())),
            }
            for module, series in norms.grad.items()
        },
        "params": params,
        "output_grad_norm": _output_grads(run),
        "value_histograms": _value_histograms(run),
        "dead_units": {module: _series(series) for module, series in report.dead_units.items()},
        "scalars": {name: _series(values) for name, values in run.scalars.items()},
    }


def _series(points: Iterable[tuple[int, float]]) -> list[list[Any]]:
    return [[step, _json_number(value)] for step, value in points]


def _value_histograms(run: Run) -> dict[str, Any]:
    """--grad-histograms: bin edges, and per parameter [step, counts] pairs."""
    if not run.grad_histograms:
        return {}
    params: dict[str, list[list[Any]]] = {}
    for histogram in run.grad_histograms:
        params.setdefault(histogram.param, []).append([histogram.step, list(histogram.counts)])
    return {"edges": run.meta.get("histogram_edges"), "params": params}


def _output_grads(run: Run) -> dict[str, list[list[Any]]]:
    """Parameter-free modules: gradient L2 norm at their output, per recorded step."""
    series: dict[str, list[list[Any]]] = {}
    for stats in run.grad_steps:
        for module, norm in stats.output_grad_norms:
            series.setdefault(module, []).append([stats.step, _json_number(norm)])
    return series


def _json_number(value: float) -> float | str:
    """JSON has no NaN/Infinity: keep them readable and valid as strings."""
    return value if math.isfinite(value) else str(value)
