"""All findings of a run: the ones probes stored plus the ones its gradient series imply."""

from __future__ import annotations

from gradtrace.analysis.grad_health import diagnose_gradients
from gradtrace.store.reader import Run, StoredFinding


def run_findings(run: Run) -> list[StoredFinding]:
    """Stored (in-place) findings first, then gradient findings derived from the series."""
    derived = diagnose_gradients(run.grad_steps, run.module_sites, run.scalars)
    return [*run.findings, *(StoredFinding(finding, 1) for finding in derived)]
