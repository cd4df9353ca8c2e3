"""The Python API: gradtrace.trace() as context manager and decorator, gradtrace.start()."""

from __future__ import annotations

import inspect
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import gradtrace
from gradtrace.api import Trace


class Gated(nn.Module):
    def __init__(self, inplace_bug: bool = True) -> None:
        super().__init__()
        self.gate = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=inplace_bug)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate(x))
        return self.act(gate)  # BUG LINE when inplace


def _marked_line(obj: object, marker: str) -> int:
    lines, first = inspect.getsourcelines(obj)
    return next(first + i for i, line in enumerate(lines) if marker in line)


BUG_LINE = _marked_line(Gated, "BUG LINE")


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, tr: gradtrace.Trace | None = None
) -> torch.Tensor:
    loss = model(torch.randn(3, 4)).sum()
    loss.backward()
    if tr is not None:
        tr.log(loss=loss.detach(), lr=0.1)  # before optimizer.step(): scalars of this step
    optimizer.step()
    optimizer.zero_grad()
    return loss


def test_context_manager_clean_run(tmp_path: Path) -> None:
    model = Gated(inplace_bug=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.trace(model, out=tmp_path / "run", level="light") as tr:
        assert tr.active and tr.run_dir == tmp_path / "run"
        for _ in range(3):
            train_step(model, optimizer, tr)
    assert not tr.active
    assert tr.findings == []
    run = gradtrace.load_run(tmp_path / "run")
    assert (run.status, run.steps, run.meta["level"]) == ("ok", 3, "light")
    assert run.meta["front_end"] == "trace"
    assert [step for step, _ in run.scalars["loss"]] == [0, 1, 2]
    assert [value for _, value in run.scalars["lr"]] == [0.1, 0.1, 0.1]


def test_exception_reraised_unchanged_with_finding(tmp_path: Path) -> None:
    model = Gated()
    with pytest.raises(RuntimeError) as caught, gradtrace.trace(model, out=tmp_path / "run") as tr:
        model(torch.randn(3, 4)).sum().backward()
    assert type(caught.value) is RuntimeError
    [finding] = tr.findings
    assert (finding.file, finding.line, finding.module) == (__file__, BUG_LINE, "act")
    # The probe's own error already carries the attribution: no duplicate note.
    assert f"gradtrace: {finding.message}" in str(caught.value)
    assert getattr(caught.value, "__notes__", []) == []
    run = gradtrace.load_run(tmp_path / "run")
    assert run.status == "failed"
    assert run.meta["exception"]["type"] == "RuntimeError"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
def test_other_exception_gets_the_finding_as_a_note(tmp_path: Path) -> None:
    # A silent write (through .data) corrupts a saved tensor without any error; the user's
    # own check then fails. The exception type stays the user's; the note names the write.
    model = nn.Linear(4, 4)
    with (
        pytest.raises(ValueError, match="loss went bad") as caught,
        gradtrace.trace(model, out=tmp_path / "run") as tr,
    ):
        out = torch.sigmoid(model(torch.randn(3, 4)))
        out.data.mul_(2)  # silent overwrite of sigmoid's saved output
        out.sum().backward()
        raise ValueError("loss went bad")
    assert type(caught.value) is ValueError
    assert tr.findings, "the silent overwrite should be a finding"
    [note] = caught.value.__notes__
    assert note.startswith(f"gradtrace: {tr.findings[0].message}")
    assert str(caught.value) == "loss went bad"


def test_decorator_each_call_is_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    @gradtrace.trace
    def bare(x: int) -> int:
        return x + 1

    @gradtrace.trace(level="light")
    def configured() -> str:
        return "done"

    assert bare(1) == 2 and bare.__name__ == "bare"
    first = bare.gradtrace.run_dir
    assert bare(2) == 3
    assert bare.gradtrace.run_dir != first
    assert configured() == "done"
    runs = sorted(p.name for p in (tmp_path / "gradtrace-runs").iterdir())
    assert len(runs) == 3
    assert sum(name.endswith("-bare") or "-bare-" in name for name in runs) == 2
    assert gradtrace.load_run(configured.gradtrace.run_dir).meta["level"] == "light"


def test_decorator_records_failure(tmp_path: Path) -> None:
    @gradtrace.trace(out=tmp_path / "run")
    def fails() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError):
        fails()
    assert gradtrace.load_run(tmp_path / "run").status == "failed"


def test_start_stop(tmp_path: Path) -> None:
    model = Gated(inplace_bug=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = gradtrace.start(model, out=tmp_path / "run")
    try:
        train_step(model, optimizer)
        assert tr.step == 1
    finally:
        tr.stop()
    tr.stop()  # idempotent
    assert gradtrace.load_run(tmp_path / "run").status == "ok"
    with pytest.raises(gradtrace.GradtraceError, match="not running"):
        tr.log(loss=1.0)
    with pytest.raises(gradtrace.GradtraceError, match="runs once"):
        tr.start()


def test_default_run_dir_named_after_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with gradtrace.trace(Gated(inplace_bug=False)) as tr:
        pass
    assert tr.run_dir is not None
    assert tr.run_dir.parent == Path("gradtrace-runs")
    assert tr.run_dir.name.endswith("-Gated")


def test_nested_session_is_a_clear_error(tmp_path: Path) -> None:
    with gradtrace.trace(out=tmp_path / "outer"):
        with (
            pytest.raises(gradtrace.GradtraceError, match=r"already tracing into .*outer"),
            gradtrace.trace(out=tmp_path / "inner"),
        ):
            pass
        with pytest.raises(gradtrace.GradtraceError, match="already tracing"):
            gradtrace.start(out=tmp_path / "inner2")
    assert not (tmp_path / "inner").exists()
    assert gradtrace.load_run(tmp_path / "outer").status == "ok"


def test_concurrent_session_from_another_thread_is_refused(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def other() -> None:
        try:
            gradtrace.start(out=tmp_path / "other").stop()
        except gradtrace.GradtraceError as error:
            errors.append(error)

    with gradtrace.trace(out=tmp_path / "main"):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "already tracing" in str(errors[0])


def test_existing_out_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(gradtrace.GradtraceError, match="already exists"):
        gradtrace.start(out=tmp_path / "run")


def test_keyboard_interrupt_is_recorded_as_interrupted(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), gradtrace.trace(out=tmp_path / "run"):
        raise KeyboardInterrupt
    assert gradtrace.load_run(tmp_path / "run").status == "interrupted"


def test_public_names() -> None:
    assert gradtrace.trace().__class__ is Trace
    assert {"trace", "start", "Trace"} <= set(gradtrace.__all__)


def test_update_ratio_option_of_every_api_form(tmp_path: Path) -> None:
    model = Gated(inplace_bug=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    @gradtrace.trace(out=tmp_path / "decorated", update_ratio=True)
    def train() -> None:
        train_step(model, optimizer)

    train()
    with gradtrace.trace(model, out=tmp_path / "block", update_ratio=True):
        train_step(model, optimizer)
    gradtrace.start(model, out=tmp_path / "started", update_ratio=True).stop()
    for name in ("decorated", "block", "started"):
        assert gradtrace.load_run(tmp_path / name).meta["update_ratio"] is True
    for name in ("decorated", "block"):
        [stats] = gradtrace.load_run(tmp_path / name).grad_steps
        assert all(p.update_norm > 0 for p in stats.params)


def test_a_misspelt_option_is_a_type_error_as_for_any_keyword(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"Unknown trace option.*evry"):
        gradtrace.trace(out=tmp_path / "run", evry=2)
    with pytest.raises(TypeError, match="evry"):
        gradtrace.start(out=tmp_path / "run", evry=2)
    assert not (tmp_path / "run").exists()


def test_summary_at_stop_comes_from_the_one_read_close_makes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A 20 000-step run of a 150-parameter model is millions of rows: read them once.
    import gradtrace.api
    import gradtrace.session

    reads = []

    def counted(path: Path) -> object:
        reads.append(path)
        return load_run(path)

    load_run = gradtrace.session.load_run
    monkeypatch.setattr(gradtrace.session, "load_run", counted)
    monkeypatch.setattr(gradtrace.api, "load_run", counted)
    model = Gated(inplace_bug=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = Trace(model, out=tmp_path / "run", level="light")
    trace.start()
    trace.summarize_at_stop()
    for _ in range(2):
        train_step(model, optimizer, trace)
    trace.stop()
    assert reads == [tmp_path / "run"]
    summary = capsys.readouterr().err
    assert "run directory:" in summary
    assert "could not render" not in summary
