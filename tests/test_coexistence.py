"""Checkpointing, eval loops, autocast and forked processes under gradtrace: same behaviour,
right findings."""

from __future__ import annotations

import multiprocessing
import warnings
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradtrace
from gradtrace.analysis.report import build_report
from gradtrace.probes import saved as saved_probe
from gradtrace.reporters.json_report import render_json
from gradtrace.reporters.terminal import TerminalReporter
from gradtrace.session import Session
from gradtrace.store.reader import load_run


@pytest.mark.parametrize("reentrant", [False, True])
def test_write_to_a_checkpointed_regions_input_is_attributed(
    tmp_path: Path, reentrant: bool
) -> None:
    torch.manual_seed(0)
    stem, block = nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))

    def run() -> None:
        h = torch.sigmoid(stem(torch.randn(2, 4)))
        y = checkpoint(block, h, use_reentrant=reentrant)
        h.mul_(2)  # the region's input, needed to recompute it in backward
        y.sum().backward()

    with pytest.raises(RuntimeError) as plain:
        run()
    session = Session(tmp_path / "run")
    with pytest.raises(RuntimeError) as traced, session:
        run()
    prefix = "one of the variables needed for gradient computation has been modified"
    assert str(plain.value).startswith(prefix) and str(traced.value).startswith(prefix)
    [finding] = session.findings
    assert (finding.op, finding.line, finding.file) == (
        "mul_",
        run.__code__.co_firstlineno + 3,
        __file__,
    )


def test_eval_loops_under_inference_mode_and_no_grad(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(inplace=True), nn.Linear(16, 1)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Session(tmp_path / "run") as session:
        for _ in range(3):
            model.train()
            loss = model(torch.randn(8, 8)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.eval()
            with torch.inference_mode():
                out = model(torch.randn(4, 8))
                out += 1  # in-place on inference tensors: no version counter at all
            with torch.no_grad():
                model(torch.randn(4, 8)).mul_(2)
    assert session.findings == []


def test_bf16_autocast_clean_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Session(tmp_path / "run") as session:
        for _ in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(torch.randn(8, 8)).float().square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert session.findings == []


def test_starting_under_anomaly_mode_warns_nothing(tmp_path: Path) -> None:
    # The session asks torch once how it words its error; make it ask again here.
    saved_probe._learnt_wording.cache_clear()
    with warnings.catch_warnings(record=True) as caught, torch.autograd.set_detect_anomaly(True):
        warnings.simplefilter("always")
        with Session(tmp_path / "run"):
            pass
        assert torch.is_anomaly_enabled()
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize(
    ("reentrant", "how"), [(False, "non-reentrant"), (True, "recomputed in backward")]
)
def test_the_report_names_the_modules_checkpointing_ran(
    tmp_path: Path, reentrant: bool, how: str
) -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "stem": nn.Linear(4, 8),
            "block": nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)),
            "head": nn.Linear(8, 1),
        }
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Session(tmp_path / "run", model=model) as session:
        for _ in range(2):
            h = model["stem"](torch.randn(2, 4))
            h = checkpoint(model["block"], h, use_reentrant=reentrant)
            model["head"](h).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert session.findings == []
    run = load_run(tmp_path / "run")
    assert run.meta["checkpointed"] == {
        name: how for name in ["block", "block.0", "block.1", "block.2"]
    }
    assert render_json(build_report(run))["run"]["checkpointed"] == run.meta["checkpointed"]
    console = Console(width=200, record=True)
    TerminalReporter(console).render(build_report(run))
    assert "4 modules ran under activation checkpointing: block (" in console.export_text()


def test_no_checkpointing_no_note(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with Session(tmp_path / "run"):
        model(torch.randn(2, 4)).sum().backward()
    assert "checkpointed" not in load_run(tmp_path / "run").meta


def _train_steps(steps: int) -> None:
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()


def _train_and_close(steps: int) -> None:
    """A forked child that also reaches the end of the traced block it inherited."""
    from gradtrace.session import active

    _train_steps(steps)
    session = active()
    assert session is not None
    session.close()


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_a_process_forked_while_tracing_trains_and_leaves_the_run_alone(tmp_path: Path) -> None:
    """The child inherits the hooks but not the store thread: it must neither hang at a step
    end nor write into the parent's run."""
    with gradtrace.trace(out=tmp_path / "run"):
        _train_steps(2)
        child = multiprocessing.get_context("fork").Process(target=_train_and_close, args=(5,))
        child.start()
        child.join(timeout=60)
        alive = child.is_alive()
        if alive:
            child.kill()
        assert not (tmp_path / "run" / "trace.json").exists()  # the child's close did nothing
        _train_steps(1)
    assert (tmp_path / "run" / "trace.json").exists()  # the parent's close wrote it
    assert not alive and child.exitcode == 0
    run = load_run(tmp_path / "run")
    assert run.steps == 3 and [s.step for s in run.grad_steps] == [0, 1, 2]
