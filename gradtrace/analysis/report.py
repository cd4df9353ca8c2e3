"""A run as every reporter reads it: the run, its findings, and the series derived from it.

Findings are derived here, once per report: the terminal summary, the JSON document, the HTML
page, trace.json and TensorBoard all render the same `Report`, so a `gradtrace report --html
--json`, or a session's close writing trace.json and printing its summary, analyses the run
once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from gradtrace.analysis.findings import classify
from gradtrace.analysis.grad_health import (
    ClipStep,
    ModuleNorms,
    clipping,
    dead_unit_fractions,
    module_norms,
)
from gradtrace.analysis.silence import SilencedFinding
from gradtrace.store.reader import Run, StoredFinding


@dataclass(frozen=True)
class Report:
    """One run and everything analysis says about it. Build it with `build_report`.

    The derived series are computed when a reporter first asks for them, then kept: a session
    builds a report at every close, and one that only writes trace.json never pays for
    aggregating every step's norms.
    """

    run: Run
    # Stored findings first, then those the recorded series imply (see `classify`).
    findings: tuple[StoredFinding, ...]
    # Findings an ignore comment or a `gradtrace.ignore` block silenced: counted, not shown.
    silenced: tuple[SilencedFinding, ...] = ()

    @property
    def derived_findings(self) -> tuple[StoredFinding, ...]:
        """The findings analysis added to the stored ones (gradient and rank findings)."""
        stored = {id(finding) for finding in self.run.findings}
        return tuple(finding for finding in self.findings if id(finding) not in stored)

    @cached_property
    def norms(self) -> ModuleNorms:
        """Per-module and global gradient, parameter and update-ratio norms per step."""
        return module_norms(self.run.grad_steps)

    @cached_property
    def clips(self) -> list[ClipStep]:
        """Recorded steps that called clip_grad_norm_, in step order."""
        return clipping(self.run.grad_steps)

    @cached_property
    def dead_units(self) -> dict[str, list[tuple[int, float]]]:
        """Per ReLU-like module: the fraction of its units dead for the whole batch, per step."""
        return dead_unit_fractions(self.run.grad_steps)


def build_report(run: Run) -> Report:
    """The report every reporter renders; the one place a loaded run's findings are derived."""
    findings = classify(run)
    return Report(run, tuple(findings.shown), tuple(findings.silenced))
