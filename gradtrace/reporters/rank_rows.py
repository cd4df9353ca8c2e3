"""A torchrun job's ranks as every reporter lists them: how each ended, who failed first."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from gradtrace.store.format import OK
from gradtrace.store.reader import Run, StoredFinding


@dataclass(frozen=True)
class RankRow:
    rank: int | None
    node: int | None  # torchrun's node (agent) rank
    host: str
    ok: bool
    status: str  # "failed (exit 1) · failed first"
    steps: int
    findings: int
    error: str  # first line of the exception, "" if none


def rank_rows(job: Run, findings: Sequence[StoredFinding]) -> list[RankRow]:
    """One row per rank of a merged job, with the findings tagged with that rank."""
    first_failed = job.meta.get("first_failed_rank")
    per_rank = Counter(stored.finding.rank for stored in findings)
    rows = []
    for run in job.ranks:
        exit_code = run.meta.get("exit_code")
        status = run.status if exit_code in (None, 0) else f"{run.status} (exit {exit_code})"
        if run.rank == first_failed:
            status += " · failed first"
        exception = run.meta.get("exception") or {}
        error = f"{exception.get('type')}: {exception.get('message')}" if exception else ""
        rows.append(
            RankRow(
                rank=run.rank,
                node=run.meta.get("node_rank"),
                host=run.meta.get("host") or "",
                ok=run.status == OK,
                status=status,
                steps=run.steps,
                findings=per_rank[run.rank],
                error=error.splitlines()[0] if error else "",
            )
        )
    return rows
