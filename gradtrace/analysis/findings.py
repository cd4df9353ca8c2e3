"""All findings of a run: the ones probes stored plus the ones its recorded series imply."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gradtrace.analysis.cross_rank import diagnose_ranks
from gradtrace.analysis.grad_health import diagnose_gradients
from gradtrace.analysis.silence import SilencedFinding, regions, split_silenced
from gradtrace.store.reader import Run, StoredFinding


@dataclass(frozen=True)
class RunFindings:
    """A run's findings to show, and those silenced on purpose (analysis/silence.py)."""

    shown: list[StoredFinding]
    silenced: list[SilencedFinding]


def run_findings(run: Run) -> list[StoredFinding]:
    """The findings to show (see `classify`)."""
    return classify(run).shown


def classify(run: Run) -> RunFindings:
    """Stored (in-place) findings first, then gradient findings derived from the series;
    those an ignore comment or `gradtrace.ignore` block silenced go apart, with how.

    A torchrun job's stored findings come tagged with their rank (see `merge_ranks`); its
    derived ones follow, each rank's in rank order, tagged the same way.
    """
    if run.ranks:
        derived = [_on_rank(stored, rank.rank) for rank in run.ranks for stored in _derived(rank)]
        everything = [*run.findings, *derived]
    else:
        everything = [*run.findings, *_derived(run)]
    blocks = [block for part in (run, *run.ranks) for block in regions(part.meta)]
    return RunFindings(*split_silenced(everything, blocks))


def _derived(run: Run) -> list[StoredFinding]:
    findings = [
        *diagnose_gradients(run.grad_steps, run.module_sites, run.scalars),
        *diagnose_ranks(run.rank_norms, run.module_sites),
    ]
    return [StoredFinding(finding, 1) for finding in findings]


def _on_rank(stored: StoredFinding, rank: int | None) -> StoredFinding:
    """Tag with the recording rank; a rank-divergence finding keeps the rank it blames."""
    if stored.finding.rank is not None:
        return stored
    return StoredFinding(dataclasses.replace(stored.finding, rank=rank), stored.count)
