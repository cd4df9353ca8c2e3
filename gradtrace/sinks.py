"""What a session's records go to: the run writer, live TensorBoard, any other sink.

The session collects; sinks consume. Each record the probes produce is handed to every sink
the session holds, in the order the run writer gets it, so a sink shows what the store
keeps. What a run writes only once it is read back and analysed (trace.json, the summary,
the findings count) is no sink: front ends register those with `Session.after_close`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from gradtrace.events import (
    Finding,
    GradHistogram,
    ProbeFailure,
    RankNorms,
    Span,
    StepGradStats,
    TracedWrite,
)

# (owner, op, phase) -> in-place writes, for one step.
WriteCounts = Iterable[tuple[tuple[str, str, str], int]]


@runtime_checkable
class Sink(Protocol):
    """Consumes a run's records as they are collected.

    Step records (`write_scalars` ... `write_step`) come from the session's store thread, a
    step's records before its `write_step`, which ends the step; findings and probe failures
    come from any thread (autograd's backward threads too). A sink never raises into
    training: on failure it says so once on stderr and stops (NOTE [store failure] in
    store/writer.py). A sink that shows nothing of a kind of record takes it and does nothing.
    """

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        """Named values (`loss`, `amp/scale`) of one step."""

    def write_grad_stats(self, stats: StepGradStats) -> None:
        """One optimizer's recorded step; several optimizers stepping make several records."""

    def write_histograms(self, histograms: list[GradHistogram]) -> None:
        """Gradient value histograms (`grad_histograms`), one per parameter."""

    def write_rank_norms(self, norms: RankNorms) -> None:
        """Every rank's parameter norms at one recorded step (`check_ranks`)."""

    def write_timeline(
        self, spans: Iterable[Span], writes: Iterable[TracedWrite], threads: dict[int, str]
    ) -> None:
        """A traced step's spans and writes (`trace_steps`), and thread names first seen."""

    def write_step(self, step: int, counts: WriteCounts, *, finished: bool) -> None:
        """A step's in-place write counts; `finished` ends the step."""

    def add_finding(self, finding: Finding) -> object:
        """Every finding as a probe reports it, repeats included: a sink that keeps one
        record per bug recognises a repeat by `Finding.same_bug`. The result is ignored."""

    def add_probe_failure(self, failure: ProbeFailure) -> None:
        """A probe that failed and switched itself off."""

    def close(self) -> None:
        """The records end (tracing stopped); called once, on every exit path."""
