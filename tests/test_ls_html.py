"""`gradtrace ls` and the HTML report (rendered in headless Chromium when it is installed)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from chromium import chromium_command, needs_chromium
from cli_process import gradtrace as run_cli
from cli_process import kill_when_ready
from events_factory import evidence, write

from gradtrace.analysis.culprits import diagnose
from gradtrace.analysis.report import build_report
from gradtrace.events import ParamStat, StepGradStats
from gradtrace.reporters.html import render_html
from gradtrace.store.format import FAILED, FINDINGS_AT_CLOSE, INTERRUPTED, OK, RUNNING
from gradtrace.store.reader import Run, StoredFinding, load_run
from gradtrace.store.writer import RunWriter, add_meta

TRAIN = """
import sys, time, torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(4):
    opt.zero_grad()
    x = torch.randn(16, 4)
    x.mul_(2)
    model(x).pow(2).mean().backward()
    opt.step()
print("ready", flush=True)
time.sleep(60)
"""


def gradtrace(*args: str, cwd: Path):
    """The CLI with a wide terminal, so tables do not wrap."""
    return run_cli(*args, cwd=cwd, env={**os.environ, "COLUMNS": "200"})


def stored_run(path: Path, status: str, *, steps: int, argv: list[str]) -> None:
    """A run directory written through the store's own writer, as a session leaves it."""
    writer = RunWriter(path)
    writer.set_meta(status=status, started_ns=time.time_ns(), argv=argv, level="full")
    for step in range(steps):
        writer.write_step(step, [(("SGD.step", "add_", "optimizer"), 2)], finished=True)
    if status != RUNNING:
        writer.set_meta(exit_code=0 if status == OK else 1)
    writer.close()


def test_ls_lists_runs_skips_foreign_dirs_and_flags_corrupt_ones(tmp_path: Path) -> None:
    runs = tmp_path / "gradtrace-runs"
    stored_run(runs / "a-ok", OK, steps=5, argv=["train.py", "--lr", "3"])
    stored_run(runs / "b-failed", FAILED, steps=2, argv=["bad.py"])
    stored_run(runs / "c-interrupted", INTERRUPTED, steps=1, argv=["slow.py"])
    stored_run(runs / "d-killed", RUNNING, steps=3, argv=["oom.py"])
    (runs / "e-foreign").mkdir()
    (runs / "e-foreign" / "notes.txt").write_text("not a run")
    (runs / "f-corrupt").mkdir()
    (runs / "f-corrupt" / "run.sqlite").write_bytes(b"garbage, not sqlite")
    (runs / "loose-file.txt").write_text("x")
    result = gradtrace("ls", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    row = {name: next(line for line in lines if name in line) for name in ("a-ok", "b-failed")}
    assert re.search(
        r"a-ok\s+│ ok\s+│\s+5 │\s+0 │ \d{4}-\d\d-\d\d \d\d:\d\d:\d\d │ train.py --lr 3", row["a-ok"]
    )
    assert re.search(r"b-failed\s+│ failed \(1\)\s+│\s+2 │", row["b-failed"])
    assert re.search(r"c-interrupted\s+│ interrupted", result.stdout)
    assert re.search(r"d-killed\s+│ killed\s+│\s+3 │", result.stdout)
    assert re.search(r"f-corrupt\s+│ unreadable", result.stdout)
    assert "e-foreign" not in result.stdout
    assert "loose-file" not in result.stdout


def _column(table: str, index: int) -> str:
    """One column of a rendered table's body, its wrapped pieces joined in order (spaces
    dropped: a wrapped line loses the space it broke at)."""
    body = [line for line in table.splitlines() if line.startswith("│")]
    return "".join(line.split("│")[index + 1].replace(" ", "") for line in body)


def test_ls_at_80_columns_wraps_instead_of_cutting(tmp_path: Path) -> None:
    runs = tmp_path / "gradtrace-runs"
    long_name = "20261202-143000-train_transformer_encoder_with_a_long_name"
    command = ["experiments/language_model/train_transformer.py", "--lr", "3e-4", "--seed", "7"]
    stored_run(runs / long_name, INTERRUPTED, steps=12345, argv=command)
    stored_run(runs / "b-short", OK, steps=5, argv=["train.py"])
    add_meta(runs / long_name, exit_code=130)
    result = run_cli("ls", cwd=tmp_path, env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.stdout
    header = next(line for line in lines if line.startswith("┃"))
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == [
        "run",
        "status",
        "steps",
        "findings",
        "started",
        "command",
    ]
    assert _column(result.stdout, 0) == f"{long_name}b-short"
    assert _column(result.stdout, 1) == "interrupted(130)ok"
    assert _column(result.stdout, 2) == "123455"
    assert _column(result.stdout, 5) == "".join(command) + "train.py"


def test_ls_counts_a_closed_runs_findings_without_reading_its_series(tmp_path: Path) -> None:
    import sqlite3

    runs = tmp_path / "gradtrace-runs"
    stored_run(runs / "closed", OK, steps=5, argv=["train.py"])
    add_meta(runs / "closed", **{FINDINGS_AT_CLOSE: 2})
    stored_run(runs / "killed", RUNNING, steps=3, argv=["oom.py"])
    for name in ("closed", "killed"):
        with sqlite3.connect(runs / name / "run.sqlite") as db:
            db.execute("DROP TABLE param_stats")  # a series nobody should need to list runs
    result = gradtrace("ls", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.search(r"closed\s+│ ok\s+│\s+5 │\s+2 │", result.stdout)
    # Counting a killed run's findings means analysing its series: here they are gone.
    assert re.search(r"killed\s+│ unreadable", result.stdout)


def test_close_stores_how_many_findings_it_found(tmp_path: Path) -> None:
    import torch

    import gradtrace

    model = torch.nn.Linear(4, 4)
    with gradtrace.trace(model, out=tmp_path / "run", level="light") as traced:
        x = torch.randn(2, 4, requires_grad=True)
        y = torch.sigmoid(model(x))
        y.mul_(2)  # overwrites what sigmoid saved
        with pytest.raises(RuntimeError):
            y.sum().backward()
    assert traced.findings
    meta = load_run(tmp_path / "run").meta
    assert meta[FINDINGS_AT_CLOSE] == len(traced.findings) == 1  # the inplace-write


def test_ls_of_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    empty = gradtrace("ls", cwd=tmp_path)
    assert empty.returncode == 0
    assert "No gradtrace runs in './gradtrace-runs' (it does not exist yet)." in empty.stdout
    missing = gradtrace("ls", "elsewhere", cwd=tmp_path)
    assert missing.returncode == 2
    assert "No directory 'elsewhere'" in missing.stderr
    assert "Traceback" not in missing.stderr


def stat(name: str, module: str, grad: float, param: float = 1.0) -> ParamStat:
    return ParamStat(name, module, 4, grad, param, 0.0, 0)


def sample_run() -> Run:
    finding = diagnose(evidence((write("relu_"), write("add_", seq=1))))
    assert finding is not None
    modules = ["encoder.0", "encoder.1.gate", "encoder.1.act", "head"]
    steps = [
        StepGradStats(
            step=step,
            optimizer="AdamW.step",
            params=tuple(
                stat(
                    f"{module}.weight",
                    module,
                    math.nan if (step, module) == (5, "head") else 0.1 * (i + 1) * (step + 1),
                )
                for i, module in enumerate(modules)
            ),
            missing=(),
            nonfinite_outputs=(),
            cut=(),
            new_sites=(),
        )
        for step in range(8)
    ]
    return Run(
        path=Path("/runs/demo"),
        meta={"status": "failed", "exit_code": 1, "argv": ["train.py"], "level": "full"},
        findings=[StoredFinding(finding, 3)],
        steps=8,
        write_counts=[
            ("encoder.1.act", "relu_", "forward", 16),
            ("AdamW.step", "lerp_", "optimizer", 64),
        ],
        step_write_counts=[
            *((s, "encoder.1.act", "relu_", "forward", 2) for s in range(8)),
            *((s, "AdamW.step", "lerp_", "optimizer", 8) for s in range(8)),
        ],
        scalars={"loss": [(s, 1.0 / (s + 1)) for s in range(8)]},
        grad_steps=steps,
    )


def test_html_is_self_contained_with_findings_heat_map_and_curves() -> None:
    page = render_html(build_report(sample_run()))
    assert page.startswith("<!DOCTYPE html>")
    # Self-contained: nothing fetched from anywhere.
    assert not re.search(r"(src|href)\s*=|url\(|@import|https?://", page)
    assert "in-place write broke backward · seen 3×" in page
    assert "module <code>encoder.act</code> · op <code>relu_</code> · forward of step 0" in page
    assert "<span class='hit'>&gt; 42 |     g.relu_()</span>" in page
    assert "<b>fix:</b> Use the out-of-place op" in page
    # The gradient heat map: one cell per module and step; head's NaN at step 5 is red.
    heatmap = page.split("Gradient norm per module × step")[1].split("</svg>")[0]
    cells = re.findall(r"<rect class='cell'[^>]*data-label='([^']*)'", heatmap)
    assert len(cells) == 4 * 8
    assert "head · step 5 · ‖grad‖ nan" in cells
    assert re.search(r"fill='#d62728' data-label='head · step 5", heatmap)
    assert "gradients went NaN/Inf" in page  # the derived finding is listed too
    assert page.count("<polyline") == 2  # global norm and loss
    assert "Scalar: loss" in page
    assert "<title>AdamW.step: 64</title>" in page
    assert "In-place writes per owner × step" in page


def test_html_bins_long_runs_keeping_the_worst_value() -> None:
    run = sample_run()
    long_steps = [
        StepGradStats(s, "SGD.step", (stat("w", "m", 1e6 if s == 777 else 1.0),), (), (), (), ())
        for s in range(1000)
    ]
    page = render_html(
        build_report(
            Run(path=run.path, meta=run.meta, findings=[], steps=1000, grad_steps=long_steps)
        )
    )
    heatmap = page.split("Gradient norm per module × step")[1].split("</svg>")[0]
    cells = re.findall(r"data-label='([^']*)'", heatmap)
    assert len(cells) <= 240
    assert any("steps 777" in c or ("–" in c and "1e+06" in c) for c in cells)
    assert "1000 steps in" in page


def run_killed(tmp_path: Path) -> Path:
    (tmp_path / "train.py").write_text(textwrap.dedent(TRAIN))
    kill_when_ready(["run", "--out", "r", "train.py"], tmp_path)
    return tmp_path / "r"


def test_html_post_mortem_of_a_killed_run_shows_its_finished_steps(tmp_path: Path) -> None:
    run_dir = run_killed(tmp_path)
    result = gradtrace("report", "r", "--html", "report.html", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "HTML report in report.html" in result.stdout
    page = (tmp_path / "report.html").read_text()
    run = load_run(run_dir)
    assert run.status == "killed"
    assert "killed" in page and "4 steps" in page
    heatmap = page.split("Gradient norm per module × step")[1].split("</svg>")[0]
    recorded = {stats.step for stats in run.grad_steps}
    assert recorded and min(recorded) == 0
    for step in recorded:
        assert f"0 · step {step} · ‖grad‖" in heatmap
    writes = page.split("In-place writes per owner × step")[1]
    for step in range(4):
        assert f"training loop · step {step} · writes" in writes


@needs_chromium
def test_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_html(build_report(sample_run())))
    screenshot = tmp_path / "shot.png"
    subprocess.run(
        chromium_command(
            page, tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1200,1600"
        ),
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert screenshot.is_file(), "chromium wrote no screenshot"
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG")
    assert len(data) > 20_000  # a blank 1200×1600 page compresses to a few KB
    keep = os.environ.get("GRADTRACE_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(screenshot, keep)
