"""The session collects, its sinks consume: every record reaches each sink as it reaches the
store, and the report built once at close reaches each after-close consumer."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from cores import CORES
from torch import nn

from gradtrace.analysis.report import Report, build_report
from gradtrace.errors import GradtraceError
from gradtrace.events import (
    Finding,
    GradHistogram,
    ProbeFailure,
    RankNorms,
    Span,
    StepGradStats,
    TracedWrite,
)
from gradtrace.reporters.tensorboard import LiveTensorBoard
from gradtrace.session import Session
from gradtrace.sinks import Sink
from gradtrace.store.reader import Run, load_run
from gradtrace.store.writer import RunWriter

SINK_METHODS = [
    name
    for name, member in vars(Sink).items()
    if inspect.isfunction(member) and not name.startswith("_")
]


@pytest.mark.parametrize("sink_class", [RunWriter, LiveTensorBoard])
def test_the_run_writer_and_live_tensorboard_take_every_record_as_declared(
    sink_class: type,
) -> None:
    assert len(SINK_METHODS) == 9
    for name in SINK_METHODS:
        declared = inspect.signature(getattr(Sink, name)).parameters
        implemented = inspect.signature(getattr(sink_class, name)).parameters
        assert [(p.name, p.kind) for p in implemented.values()] == [
            (p.name, p.kind) for p in declared.values()
        ], f"{sink_class.__name__}.{name}"


class Recorder:
    """A sink that keeps what it is handed, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        self.calls.append(("scalars", (step, dict(values))))

    def write_grad_stats(self, stats: StepGradStats) -> None:
        self.calls.append(("grad_stats", stats.step))

    def write_histograms(self, histograms: list[GradHistogram]) -> None:
        self.calls.append(("histograms", [h.step for h in histograms]))

    def write_rank_norms(self, norms: RankNorms) -> None:
        self.calls.append(("rank_norms", norms.step))

    def write_timeline(
        self, spans: Iterable[Span], writes: Iterable[TracedWrite], threads: dict[int, str]
    ) -> None:
        self.calls.append(("timeline", sorted({span.step for span in spans})))

    def write_step(
        self, step: int, counts: Iterable[tuple[tuple[str, str, str], int]], *, finished: bool
    ) -> None:
        self.calls.append(("step", (step, finished)))

    def add_finding(self, finding: Finding) -> None:
        self.calls.append(("finding", finding.kind))

    def add_probe_failure(self, failure: ProbeFailure) -> None:
        self.calls.append(("probe_failure", failure.probe))

    def close(self) -> None:
        self.calls.append(("close", None))

    def of(self, kind: str) -> list:
        return [value for name, value in self.calls if name == kind]


class Scorer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = torch.exp(self.proj(x))
        energy.data.mul_(0.5)  # a silent overwrite of what exp saved, every step
        return energy.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("core", CORES)
def test_a_sink_gets_what_the_store_keeps_and_consumers_get_the_report(
    tmp_path: Path, core: str
) -> None:
    torch.manual_seed(0)
    model = Scorer()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    recorder = Recorder()
    reports: list[Report] = []
    session = Session(tmp_path / "run", core=core, trace_steps="1")
    session.add_sink(lambda: recorder)
    session.after_close(reports.append)
    with session:
        for _ in range(3):
            loss = model(torch.randn(4, 6)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            session.log(loss=loss)
        assert recorder.of("close") == []
    run = load_run(tmp_path / "run")

    assert recorder.of("finding") == ["silent-overwrite"] * 3  # every repeat, as the store
    assert [stored.count for stored in run.findings] == [3]
    assert [finding.kind for finding in session.findings] == ["silent-overwrite"]
    finished = [step for step, done in recorder.of("step") if done]
    assert finished == sorted(run.step_end_ns) == [0, 1, 2]
    assert recorder.of("grad_stats") == [stats.step for stats in run.grad_steps]
    logged = {step: values["loss"] for step, values in recorder.of("scalars")}
    assert sorted(logged.items()) == run.scalars["loss"]
    assert recorder.of("timeline") == [[1]]
    assert recorder.calls[-1] == ("close", None) and len(recorder.of("close")) == 1

    (report,) = reports
    assert report.run.path == tmp_path / "run"
    assert report.findings == build_report(run).findings
    assert session.findings == [stored.finding for stored in report.findings]


def test_a_sink_that_cannot_open_fails_start_and_leaves_nothing_installed(
    tmp_path: Path,
) -> None:
    def refuse() -> Sink:
        raise OSError("no room")

    session = Session(tmp_path / "run")
    session.add_sink(refuse)
    with pytest.raises(OSError, match="no room"):
        session.start()
    # Nothing is left tracing: a new session starts.
    with Session(tmp_path / "again"):
        pass
    assert load_run(tmp_path / "again").status == "ok"


def test_sinks_are_added_before_the_session_starts(tmp_path: Path) -> None:
    refused = pytest.raises(GradtraceError, match="before the session starts")
    with Session(tmp_path / "run") as session, refused:
        session.add_sink(Recorder)


def test_live_tensorboard_that_fails_says_so_once_and_stops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = LiveTensorBoard(tmp_path / "tb").open()
    live.write_scalars(0, {"loss": "not a number"})  # type: ignore[dict-item]
    live.write_scalars(1, {"loss": 1.0})
    live.write_step(1, (), finished=True)
    live.close()
    live.finish(build_report(_empty_run(tmp_path)), step=2)
    said = capsys.readouterr().err
    assert said.count("gradtrace: TensorBoard output to") == 1
    assert "'gradtrace tensorboard RUN_DIR'" in said


def _empty_run(tmp_path: Path) -> Run:
    with Session(tmp_path / "empty"):
        pass
    return load_run(tmp_path / "empty")
