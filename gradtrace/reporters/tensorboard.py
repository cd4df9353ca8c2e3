"""TensorBoard event files: written live while a run trains, or regenerated from the store.

One class does both. `TensorBoardReporter` is told what the store is told, in the order the
store gets it (live, `LiveTensorBoard` is one of the session's sinks, beside the run writer;
the regenerator replays a stored run through it), so a live logdir and a regenerated one
hold the same series. It writes with tensorboard's own event-file writer and summary protos
(no hand-written records), imported lazily: `import gradtrace` never needs tensorboard.

Tags (module paths become tag trees: `encoder.layers.3.attn` -> `encoder/layers.3/attn`):

- `global/grad_norm`, `global/inplace_writes`, `global/findings` (findings so far)
- `global/grad_norm_before_clip`, `global/clip_max_norm` (steps that called clip_grad_norm_)
- `grad_norm/<module>`, `grad_to_param/<module>` (‖grad‖/‖param‖), `inplace_writes/<owner>`
- `update_ratio/<module>` (‖Δp‖/‖p‖, runs recorded with update_ratio)
- `dead_units/<module>` (fraction of a ReLU's units dead for the whole batch; sampled steps)
- the run's own scalars under their names (`loss`, `amp/scale`, `amp/found_inf`)
- histograms `param_grad_norm/all` and `param_grad_norm/log10` (one value per parameter)
- text `findings/<NN>-<kind>`: each finding as markdown, at the step it was seen
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from gradtrace.analysis.grad_health import clipping, dead_unit_fractions, module_norms
from gradtrace.analysis.report import Report
from gradtrace.errors import GradtraceError
from gradtrace.events import (
    HISTOGRAM_EDGES,
    Finding,
    GradHistogram,
    ProbeFailure,
    RankNorms,
    Span,
    StepGradStats,
    TracedWrite,
)
from gradtrace.reporters.finding_text import code_excerpt, finding_facts, title
from gradtrace.store.reader import Run, StoredFinding

# Subdirectory of the run directory, and of a user's logdir, that gradtrace writes into.
RUN_SUBDIR = "tensorboard"
LOGDIR_SUBDIR = "gradtrace"
# Event files gradtrace writes end with this, so regenerating replaces only its own files.
EVENT_SUFFIX = ".gradtrace"
HISTOGRAM_BUCKETS = 30
INSTALL_HINT = (
    "TensorBoard output needs the 'tensorboard' package: "
    "pip install 'gradtrace[tensorboard]' (or pip install tensorboard)."
)


def tensorboard_dir(run_dir: Path, logdir: Path | None = None) -> Path:
    """`RUN_DIR/tensorboard`, or `LOGDIR/gradtrace/<run name>` inside a user's logdir.

    The run's name keeps two traced runs in one logdir apart; TensorBoard lists it as the
    sub-run `gradtrace/<run name>`, next to the user's own runs.
    """
    if logdir is None:
        return run_dir / RUN_SUBDIR
    return logdir / LOGDIR_SUBDIR / run_dir.resolve().name


def module_tag(path: str) -> str:
    """`encoder.layers.3.attn` -> `encoder/layers.3/attn`: indices stay with their list."""
    parts: list[str] = []
    for part in path.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}.{part}"
        else:
            parts.append(part)
    return "/".join(p for p in parts if p) or "(root)"


def finding_markdown(stored: StoredFinding) -> str:
    """One finding as markdown: what, where, the code, and the fix."""
    finding = stored.finding
    seen = f" (seen {stored.count}×)" if stored.count > 1 else ""
    lines = [f"### {_escape(title(finding.kind))}{seen}", "", f"**{_escape(finding.message)}**", ""]
    facts = finding_facts(finding, lambda name: f"`{_escape_code(str(name))}`", _escape)
    lines += [f"- {fact}" for fact in facts]
    excerpt = code_excerpt(finding)
    if excerpt:
        lines += ["", "```python", *excerpt, "```"]
    lines += ["", f"**fix:** {_escape(finding.hint)}"]
    return "\n".join(lines)


class TensorBoardReporter:
    """Writes a run's series as TensorBoard events, step by step, as the store gets them.

    It is told the records a run's sinks get (`grad_stats`, `scalars`, `histograms`, `step`,
    `finding`), then `close` with the findings analysis derived (they are only known once
    the run is read back). A step's gradient statistics are written once the next step's (or
    `end_records`) arrive, so several optimizers stepping in one step make one global norm.
    Thread-safe: findings arrive from autograd's backward threads.
    """

    def __init__(self, logdir: Path) -> None:
        writer_class, self._protos = _tensorboard()
        self.logdir = logdir
        logdir.mkdir(parents=True, exist_ok=True)
        self._writer = writer_class(str(logdir), filename_suffix=EVENT_SUFFIX)
        self._lock = threading.Lock()
        self._pending: list[StepGradStats] = []
        self._findings = 0
        self._closed = False
        # Wall time (seconds) for the events: now when live, the stored step's when replayed.
        self.wall_time: float | None = None

    def grad_stats(self, stats: StepGradStats) -> None:
        with self._lock:
            if self._pending and self._pending[0].step != stats.step:
                self._write_grads(self._pending)
                self._pending = []
            self._pending.append(stats)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        with self._lock:
            for name, value in values.items():
                self._scalar(name, value, step)

    def histograms(self, histograms: Iterable[GradHistogram]) -> None:
        """Gradient value histograms (`--grad-histograms`), one per parameter and step."""
        with self._lock:
            for histogram in histograms:
                self._event(self._value_histogram(histogram), histogram.step)

    def _value_histogram(self, histogram: GradHistogram) -> Any:
        """A HistogramProto over the fixed bins. Values are known only by their bin, so
        min/max are the outer edges of the outermost non-empty bins and the sums use bin
        midpoints."""
        edges = HISTOGRAM_EDGES
        lower = (edges[0] * 10**0.5, *edges)
        upper = (*edges, edges[-1] * 10**0.5)
        used = [i for i, count in enumerate(histogram.counts) if count]
        middles = [(lower[i] + upper[i]) / 2 for i in range(len(histogram.counts))]
        proto = self._protos.HistogramProto(
            min=lower[used[0]] if used else 0.0,
            max=upper[used[-1]] if used else 0.0,
            num=sum(histogram.counts),
            sum=sum(c * m for c, m in zip(histogram.counts, middles, strict=True)),
            sum_squares=sum(c * m * m for c, m in zip(histogram.counts, middles, strict=True)),
            bucket_limit=[*edges, sys.float_info.max],
            bucket=[float(c) for c in histogram.counts],
        )
        tag = f"grad_values/{module_tag(histogram.param)}"
        return self._protos.Summary(value=[self._protos.Summary.Value(tag=tag, histo=proto)])

    def step(
        self, step: int, counts: Iterable[tuple[tuple[str, str, str], int]], *, finished: bool
    ) -> None:
        """A step's in-place write counts; `finished` marks the step done (and flushes)."""
        per_owner: dict[str, int] = {}
        for (owner, _op, _phase), count in counts:
            per_owner[owner] = per_owner.get(owner, 0) + count
        with self._lock:
            for owner, count in per_owner.items():
                self._scalar(f"inplace_writes/{module_tag(owner)}", count, step)
            if finished:
                self._scalar("global/inplace_writes", sum(per_owner.values()), step)
                self._scalar("global/findings", self._findings, step)
                self._writer.flush()

    def finding(self, finding: Finding, count: int = 1) -> None:
        """A new finding, as it is stored (live: seen once so far)."""
        with self._lock:
            self._text_finding(StoredFinding(finding, count))

    def end_records(self) -> None:
        """No more records: write the last step's gradient statistics."""
        with self._lock:
            self._write_pending()

    def close(self, derived: Sequence[StoredFinding] = (), *, step: int | None = None) -> None:
        """Write what is pending and the `derived` findings (those analysis added to the
        stored ones, see `Report.derived_findings`); `step` is the run's tail."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._write_pending()
            for stored in derived:
                self._text_finding(stored)
            if derived and step is not None:
                self._scalar("global/findings", self._findings, step)
            self._writer.close()

    def _write_pending(self) -> None:
        if self._pending:
            self._write_grads(self._pending)
            self._pending = []

    def _write_grads(self, records: Sequence[StepGradStats]) -> None:
        step = records[0].step
        norms = module_norms(records)  # one record per optimizer that stepped: one model
        for _, value in norms.global_grad:
            self._scalar("global/grad_norm", value, step)
        for clip in clipping(records):
            self._scalar("global/grad_norm_before_clip", clip.norm_before, step)
            self._scalar("global/clip_max_norm", clip.max_norm, step)
        for module, series in norms.grad.items():
            grad = series[-1][1]
            tag = module_tag(module)
            self._scalar(f"grad_norm/{tag}", grad, step)
            if module in norms.param:  # parameter norms are taken on sampled steps
                param = norms.param[module][-1][1]
                self._scalar(f"grad_to_param/{tag}", grad / param if param else math.nan, step)
        for module, series in norms.update_ratio.items():
            self._scalar(f"update_ratio/{module_tag(module)}", series[-1][1], step)
        for module, series in dead_unit_fractions(records).items():
            self._scalar(f"dead_units/{module_tag(module)}", series[-1][1], step)
        values = [p.grad_norm for stats in records for p in stats.params]
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            self._histogram("param_grad_norm/all", finite, step)
        logs = [math.log10(v) for v in finite if v > 0]
        if logs:
            self._histogram("param_grad_norm/log10", logs, step)

    def _text_finding(self, stored: StoredFinding) -> None:
        self._findings += 1
        tag = f"findings/{self._findings:02d}-{stored.finding.kind}"
        summary = self._protos.text_pb(tag, finding_markdown(stored))
        self._event(summary, stored.finding.step)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        summary = self._protos.Summary(
            value=[self._protos.Summary.Value(tag=tag, simple_value=float(value))]
        )
        self._event(summary, step)

    def _histogram(self, tag: str, values: list[float], step: int) -> None:
        self._event(self._protos.histogram_pb(tag, values, buckets=HISTOGRAM_BUCKETS), step)

    def _event(self, summary: Any, step: int) -> None:
        wall_time = time.time() if self.wall_time is None else self.wall_time
        self._writer.add_event(self._protos.Event(wall_time=wall_time, step=step, summary=summary))


class LiveTensorBoard:
    """A session's sink (see gradtrace/sinks.py): a `TensorBoardReporter` that never breaks
    training.

    `open` creates the event file as tracing starts (the session calls it once the run
    directory exists); `finish` adds the findings analysis derived after close. The first
    error (disk full, a bad value) is reported once on stderr and turns the sink off; the
    store, and so `gradtrace tensorboard RUN_DIR`, still has everything.
    """

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._reporter: TensorBoardReporter | None = None
        self._lock = threading.Lock()
        # Bugs already shown (`Finding.same_bug`): a repeat only adds to the store's count.
        self._seen: set[tuple[object, ...]] = set()

    def open(self) -> LiveTensorBoard:
        """Create the event file; returns the sink. Raises when the logdir cannot be made."""
        self._reporter = TensorBoardReporter(self.logdir)
        return self

    def write_grad_stats(self, stats: StepGradStats) -> None:
        self._guarded(lambda reporter: reporter.grad_stats(stats))

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        self._guarded(lambda reporter: reporter.scalars(step, values))

    def write_histograms(self, histograms: list[GradHistogram]) -> None:
        self._guarded(lambda reporter: reporter.histograms(histograms))

    def write_step(
        self, step: int, counts: Iterable[tuple[tuple[str, str, str], int]], *, finished: bool
    ) -> None:
        self._guarded(lambda reporter: reporter.step(step, counts, finished=finished))

    def add_finding(self, finding: Finding) -> None:
        with self._lock:
            if finding.same_bug in self._seen:
                return
            self._seen.add(finding.same_bug)
        self._guarded(lambda reporter: reporter.finding(finding))

    def write_rank_norms(self, norms: RankNorms) -> None:
        """Not shown live: cross-rank norms are compared in the report."""

    def write_timeline(
        self, spans: Iterable[Span], writes: Iterable[TracedWrite], threads: dict[int, str]
    ) -> None:
        """Not shown: the traced steps go into trace.json."""

    def add_probe_failure(self, failure: ProbeFailure) -> None:
        """Not shown: the session says it on stderr and the store keeps it."""

    def close(self) -> None:
        """The records end: write the last step's gradients (the file stays open for
        `finish`)."""
        self._guarded(lambda reporter: reporter.end_records())

    def finish(self, report: Report, *, step: int) -> None:
        """Add the findings analysis derived and close the file; `step` is the run's tail."""
        self._guarded(lambda reporter: reporter.close(report.derived_findings, step=step))
        self._reporter = None

    def _guarded(self, call: Callable[[TensorBoardReporter], None]) -> None:
        reporter = self._reporter
        if reporter is None:
            return
        try:
            call(reporter)
        except Exception as error:
            self._reporter = None
            print(
                f"gradtrace: TensorBoard output to '{self.logdir}' stopped ({error!r}); "
                "the run directory still records everything: regenerate it with "
                "'gradtrace tensorboard RUN_DIR'.",
                file=sys.stderr,
            )


def write_tensorboard(report: Report, logdir: Path) -> Path:
    """Regenerate a run's TensorBoard events from the store alone; returns the directory.

    Event files gradtrace wrote there before (live or regenerated) are replaced; anything
    else in the directory is left alone.
    """
    if logdir.exists() and not logdir.is_dir():
        raise GradtraceError(f"'{logdir}' is not a directory; choose another --logdir.")
    for old in logdir.glob(f"events.out.tfevents.*{EVENT_SUFFIX}"):
        old.unlink()
    try:
        str(logdir).encode("utf-8")
    except UnicodeEncodeError:
        # tensorboard's file writer takes UTF-8 paths only: write elsewhere, then move in.
        with tempfile.TemporaryDirectory(prefix="gradtrace-") as scratch:
            _replay(report, Path(scratch))
            logdir.mkdir(parents=True, exist_ok=True)
            for written in Path(scratch).iterdir():
                shutil.move(written, logdir / written.name)
        return logdir
    _replay(report, logdir)
    return logdir


def _replay(report: Report, logdir: Path) -> None:
    """Replay the stored run through a `TensorBoardReporter` writing into `logdir`."""
    run = report.run
    reporter = TensorBoardReporter(logdir)
    grads: dict[int, list[StepGradStats]] = {}
    for stats in run.grad_steps:
        grads.setdefault(stats.step, []).append(stats)
    scalars: dict[int, dict[str, float]] = {}
    for name, series in run.scalars.items():
        for step, value in series:
            scalars.setdefault(step, {})[name] = value
    histograms: dict[int, list[GradHistogram]] = {}
    for histogram in run.grad_histograms:
        histograms.setdefault(histogram.step, []).append(histogram)
    writes: dict[int, list[tuple[tuple[str, str, str], int]]] = {}
    for step, owner, op, phase, count in run.step_write_counts:
        writes.setdefault(step, []).append(((owner, op, phase), count))
    stored = run.findings
    steps = sorted({*grads, *scalars, *histograms, *writes, *run.step_end_ns})
    tail = max(run.step_end_ns, default=-1) + 1
    try:
        for step in steps:
            end_ns = run.step_end_ns.get(step)
            reporter.wall_time = end_ns / 1e9 if end_ns is not None else _run_time(run)
            for stats in grads.get(step, ()):
                reporter.grad_stats(stats)
            reporter.histograms(histograms.get(step, ()))
            if step in scalars:
                reporter.scalars(step, scalars[step])
            for found in stored:
                if found.finding.step == step:
                    reporter.finding(found.finding, found.count)
            reporter.step(step, writes.get(step, ()), finished=step in run.step_end_ns)
        # Findings of steps that recorded nothing else.
        recorded = set(steps)
        for found in stored:
            if found.finding.step not in recorded:
                reporter.finding(found.finding, found.count)
        reporter.close(report.derived_findings, step=tail)
    finally:
        reporter.close()


def _run_time(run: Run) -> float | None:
    ended = run.meta.get("ended_ns") or run.meta.get("started_ns")
    return ended / 1e9 if isinstance(ended, int) else None


def _escape(text: str) -> str:
    """Keep markdown from reading `*`, `_` or `<` in messages as formatting."""
    return "".join(f"\\{c}" if c in "\\`*_<>[]" else c for c in text)


def _escape_code(text: str) -> str:
    """A name set in backticks: a backtick inside would end the code span early."""
    return text.replace("`", "'")


class _Protos:
    """tensorboard's summary builders, resolved once."""

    def __init__(self) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
        from tensorboard.plugins.histogram.summary_v2 import histogram_pb
        from tensorboard.plugins.text.summary_v2 import text_pb

        self.Event = Event
        self.Summary = Summary
        self.HistogramProto = HistogramProto
        self.histogram_pb = histogram_pb
        self.text_pb = text_pb


def require_tensorboard() -> None:
    """Raise `GradtraceError` with an install hint when tensorboard is not installed."""
    _tensorboard()


def _tensorboard() -> tuple[Any, _Protos]:
    try:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        return EventFileWriter, _Protos()
    except ImportError:
        raise GradtraceError(INSTALL_HINT) from None
