"""A probe that fails never breaks training (gradtrace/probes/guard.py, NOTE [probe boundary]).

Each case breaks one entry point of one probe (a hook torch calls, a wrapper, a callback on
the store thread) and trains a small model with AdamW, GradScaler and clipping: parameters,
optimizer state, losses and RNG state must be bitwise those of the untraced run, the probe
named once in the run's record, the JSON report and the summary.
"""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from cores import NATIVE, needs_native
from rich.console import Console
from torch import nn

from gradtrace import _native
from gradtrace.analysis.report import build_report
from gradtrace.probes import (
    amp,
    backward_steps,
    clip,
    fsdp,
    grads,
    histograms,
    modules,
    native,
    rank_check,
    readouts,
    saved,
    steps,
    timeline,
    writes,
)
from gradtrace.reporters.json_report import render_json
from gradtrace.reporters.terminal import TerminalReporter
from gradtrace.session import Session
from gradtrace.store.reader import load_run


class Injected(Exception):
    """The failure a test puts into a probe."""


def _broken(*args: Any, **kwargs: Any) -> Any:
    raise Injected("injected by the test")


@dataclass(frozen=True)
class Case:
    probe: str
    owner: object
    name: str
    replacement: object = _broken
    # The saved-tensor check and write log are the Python core's; the native core's own.
    core: str = _native.NATIVE
    error: str = "Injected"

    @property
    def id(self) -> str:
        return f"{self.probe.replace(' ', '-')}:{self.name}"


CASES = [
    Case("module stack", modules.ModuleStackProbe, "_enter"),
    Case("module stack", modules.ModuleStackProbe, "_leave"),
    Case("step counter", steps.StepProbe, "_before"),
    Case("step counter", steps.StepProbe, "_after"),
    Case("gradient statistics", grads.GradStatsProbe, "_after_forward"),
    Case("gradient statistics", grads.GradStatsProbe, "_before_step"),
    Case("gradient statistics", grads.GradStatsProbe, "_after_update"),
    Case("gradient statistics", grads.GradStatsProbe, "_arrived_hook"),
    Case("gradient statistics", grads.GradStatsProbe, "_output_grad_arrived"),
    Case("gradient statistics", grads.GradStatsProbe, "note_clip"),
    Case("gradient statistics", grads.GradStatsProbe, "end_iteration"),
    # Read back on the store thread, a step late.
    Case("gradient statistics", grads, "StepGradStats"),
    Case("saved-tensor check", saved.SavedTensorProbe, "_pack", core=_native.PYTHON),
    Case("saved-tensor check", saved.SavedTensorProbe, "_unpack", core=_native.PYTHON),
    Case("write log", writes.WriteLogProbe, "record", core=_native.PYTHON),
    Case("write log", writes, "_op_info", core=_native.PYTHON),
    Case("native core", native.NativeCoreProbe, "_step_aside"),
    Case("native core", native.NativeCoreProbe, "_traced_write"),
    # The compiled core's own failure (it stops itself), as it reports it.
    Case(
        "native core",
        _native.load(),
        "failure",
        lambda: "injected by the test",
        error="NativeCoreError",
    ),
    Case("timeline", timeline.TimelineProbe, "_enter"),
    Case("timeline", timeline.TimelineProbe, "_leave"),
    Case("timeline", timeline.TimelineProbe, "take"),
    Case("timeline", timeline.TimelineProbe, "add_write"),
    Case("timeline", timeline._Call, "output_grad"),
    Case("timeline", timeline._Call, "output_node_done"),
    Case("timeline", timeline._ParamWatch, "accumulated"),
    # The wrapper binds clip_grad_norm_'s arguments after the call.
    Case(
        "gradient clipping",
        clip,
        "inspect",
        SimpleNamespace(signature=lambda _: SimpleNamespace(bind=_broken)),
    ),
    Case("AMP loss scale", amp.GradScalerProbe, "_before_update"),
    Case("gradient histograms", histograms.GradHistogramProbe, "_count_into"),
    Case("gradient histograms", histograms.GradHistogramProbe, "_read"),
    Case("rank check", rank_check.RankCheckProbe, "compare"),
    # `loss.detach()` is a read-out; every optimizer step judges the pending ones.
    Case("read-out check", readouts.ReadoutProbe, "_seen"),
    Case("read-out check", readouts.ReadoutProbe, "_judge"),
    # Watches the first backward pass, then sees the optimizer count the steps.
    Case("backward steps", backward_steps.BackwardStepProbe, "_after_forward"),
    Case("backward steps", backward_steps.BackwardStepProbe, "_arrived"),
    Case("backward steps", backward_steps.BackwardStepProbe, "_backward_done"),
    # Looks FSDP2's private internals up as the session starts and at each root forward.
    Case("FSDP2 writes", fsdp.FsdpWritesProbe, "_wrap"),
    # Installing is an entry point too: a probe that cannot install is off from the start.
    *(
        Case(probe, owner, "_install", core=core)
        for probe, owner, core in [
            ("module stack", modules.ModuleStackProbe, NATIVE),
            ("step counter", steps.StepProbe, NATIVE),
            ("gradient statistics", grads.GradStatsProbe, NATIVE),
            ("AMP loss scale", amp.GradScalerProbe, NATIVE),
            ("gradient clipping", clip.GradClipProbe, NATIVE),
            ("backward steps", backward_steps.BackwardStepProbe, NATIVE),
            ("read-out check", readouts.ReadoutProbe, NATIVE),
            ("native core", native.NativeCoreProbe, NATIVE),
            ("saved-tensor check", saved.SavedTensorProbe, _native.PYTHON),
            ("write log", writes.WriteLogProbe, _native.PYTHON),
            ("FSDP2 writes", fsdp.FsdpWritesProbe, NATIVE),
            ("timeline", timeline.TimelineProbe, NATIVE),
        ]
    ),
]


def train(steps_: int = 4) -> dict[str, Any]:
    """A short real training run touching every probe; what it ends with."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    data = torch.randn(steps_, 6, 8, generator=torch.Generator().manual_seed(1))
    losses = []
    for x in data:
        loss = nn.functional.dropout(model(x), 0.1).square().mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict()["state"],
        "losses": losses,
        "rng": torch.get_rng_state(),
    }


def assert_bitwise_equal(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_bitwise_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_bitwise_equal(x, y)
    else:
        assert a == b


def summary_text(run_dir: Path) -> str:
    out = io.StringIO()
    TerminalReporter(Console(file=out, width=300, color_system=None)).render(
        build_report(load_run(run_dir))
    )
    return out.getvalue()


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, marks=needs_native) if case.core == NATIVE else case for case in CASES],
    ids=[case.id for case in CASES],
)
def test_a_failing_probe_leaves_training_bitwise_unchanged(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = train()
    monkeypatch.setattr(case.owner, case.name, case.replacement)
    session = Session(
        tmp_path / "run",
        level="full",
        update_ratio=True,
        grad_histograms=1,
        check_ranks=True,
        core=case.core,
    )
    with session:
        traced = train()
    assert_bitwise_equal(traced, plain)

    assert session.core == case.core
    assert [failure.probe for failure in session.probe_failures] == [case.probe]
    failure = session.probe_failures[0]
    assert (failure.error, failure.message) == (case.error, "injected by the test")
    assert failure.where != "an unknown place"
    run = load_run(tmp_path / "run")
    assert run.status == "ok"
    assert run.probe_failures == [failure]
    reported = render_json(build_report(run))["probe_failures"]
    assert [(f["probe"], f["error"], f["step"]) for f in reported] == [
        (case.probe, case.error, failure.step)
    ]
    assert f"probe failed: the {case.probe} probe failed at step {failure.step}" in summary_text(
        tmp_path / "run"
    )


def test_where_names_the_line_of_gradtrace_that_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grads, "StepGradStats", _broken)
    with Session(tmp_path / "run") as session:
        train()
    (failure,) = session.probe_failures
    assert failure.where.startswith("gradtrace/probes/grads.py:"), failure.where
    assert failure.where.endswith(" in stats")  # _StepRecord.stats builds the record


class Saves(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(x)
        y.mul_(2)  # overwrites what sigmoid saved
        return y


@pytest.mark.parametrize(
    ("owner", "name", "core"),
    [
        (saved.SavedTensorProbe, "_pack", _native.PYTHON),
        (saved.SavedTensorProbe, "_unpack", _native.PYTHON),
        (writes.WriteLogProbe, "record", _native.PYTHON),
        (modules.ModuleStackProbe, "_enter", _native.PYTHON),
        pytest.param(native.NativeCoreProbe, "_on_check", NATIVE, marks=needs_native),
        pytest.param(modules.ModuleStackProbe, "_enter", NATIVE, marks=needs_native),
    ],
)
def test_an_inplace_error_still_raises_with_a_probe_off(
    owner: object, name: str, core: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saved-tensor hooks switch PyTorch's own version check off: a broken probe must not
    turn a loud in-place bug silent."""
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError) as plain:
        Saves()(x).sum().backward()
    monkeypatch.setattr(owner, name, _broken)
    session = Session(tmp_path / "run", core=core)
    with pytest.raises(RuntimeError) as traced, session:
        Saves()(x).sum().backward()
    assert str(plain.value).split(" is at version")[0] in str(traced.value)
    assert "is at version 1; expected version 0" in str(traced.value)
    assert len(session.probe_failures) == 1


def _refused_update() -> None:
    weight = nn.Parameter(torch.ones(3))
    weight.add_(1.0)  # PyTorch refuses an in-place write to a leaf that requires grad


def test_a_failing_refused_write_probe_leaves_the_error_as_pytorch_raised_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeError) as plain:
        _refused_update()
    monkeypatch.setattr(Session, "_record_refused", _broken)
    session = Session(tmp_path / "run")
    with pytest.raises(RuntimeError) as traced, session:
        _refused_update()
    assert str(traced.value) == str(plain.value)
    assert [failure.probe for failure in session.probe_failures] == ["refused writes"]
    assert session.findings == []


SCRIPT = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
for step in range(3):
    loss = model(torch.randn(5, 4)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(step, loss.item().hex())
print([p.detach().double().sum().item().hex() for p in model.parameters()])
"""

# `gradtrace run` through the CLI's own entry point, with the gradient statistics broken.
DRIVER = """
import sys
from gradtrace.probes.grads import GradStatsProbe
def broken(*args, **kwargs):
    raise KeyError("injected by the test")
GradStatsProbe._before_step = broken
from gradtrace.cli import main
sys.exit(main(["run", "--out", "run", "train.py"]))
"""


def test_cli_run_with_a_failing_probe_exits_as_python_does(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(textwrap.dedent(SCRIPT))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )

    plain = run("train.py")
    traced = run("-c", DRIVER)
    assert plain.returncode == traced.returncode == 0, traced.stderr
    assert traced.stdout == plain.stdout
    line = "gradtrace: the gradient statistics probe failed at step 0 and is off"
    assert traced.stderr.count(line) == 1, traced.stderr
    assert "probe failed: the gradient statistics probe failed at step 0" in traced.stderr
    assert "Traceback" not in traced.stderr
    report = json.loads(run("-m", "gradtrace", "report", "run", "--json").stdout)
    (failure,) = report["probe_failures"]
    assert failure["probe"] == "gradient statistics"
    assert failure["error"] == "KeyError"
    assert "injected by the test" in failure["message"]
    assert report["run"]["status"] == "ok"


def test_runs_recorded_before_probe_failures_were_stored_still_read(tmp_path: Path) -> None:
    with Session(tmp_path / "run"):
        pass
    db = sqlite3.connect(tmp_path / "run" / "run.sqlite")
    db.execute("DROP TABLE probe_failures")  # run format 1, before probe failures were kept
    db.execute("UPDATE meta SET value = '1' WHERE key = 'format'")
    db.commit()
    db.close()
    run = load_run(tmp_path / "run")
    assert run.probe_failures == []
    assert render_json(build_report(run))["probe_failures"] == []
