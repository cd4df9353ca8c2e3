"""All findings of a run: the ones probes stored plus the ones its recorded series imply."""

from __future__ import annotations

import dataclasses

from gradtrace.analysis.cross_rank import diagnose_ranks
from gradtrace.analysis.grad_health import diagnose_gradients
from gradtrace.store.reader import Run, StoredFinding


def run_findings(run: Run) -> list[StoredFinding]:
    """Stored (in-place) findings first, then gradient findings derived from the series.

    A torchrun job's findings are each rank's, in rank order, tagged with the rank.
    """
    if run.ranks:
        return [_on_rank(stored, rank.rank) for rank in run.ranks for stored in run_findings(rank)]
    derived = [
        *diagnose_gradients(run.grad_steps, run.module_sites, run.scalars),
        *diagnose_ranks(run.rank_norms, run.module_sites),
    ]
    return [*run.findings, *(StoredFinding(finding, 1) for finding in derived)]


def _on_rank(stored: StoredFinding, rank: int | None) -> StoredFinding:
    if stored.finding.rank is not None:
        return stored
    return StoredFinding(dataclasses.replace(stored.finding, rank=rank), stored.count)
