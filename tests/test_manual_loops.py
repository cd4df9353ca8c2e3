"""Loops that no optimizer steps count their steps by backward passes and record gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_process import gradtrace
from cores import CORES
from torch import nn

from gradtrace._native import CORE_ENV
from gradtrace.session import Session
from gradtrace.store import load_run

# pytorch/examples' word_language_model updates this way: no torch.optim at all.
MANUAL_LOOP = """\
import json
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
lr, norms = 0.1, []
for step in range(5):
    model.zero_grad()
    loss = model(torch.randn(16, 4)).square().mean()
    loss.backward()
    norms.append({n: p.grad.norm().item() for n, p in model.named_parameters()})
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    for p in model.parameters():
        p.data.add_(p.grad, alpha=-lr)
print(json.dumps({"norms": norms, "digest": [p.sum().item() for p in model.parameters()]}))
"""


@pytest.mark.parametrize("core", CORES)
def test_a_manual_loop_counts_backward_passes_and_records_their_gradients(
    tmp_path: Path, core: str
) -> None:
    (tmp_path / "manual.py").write_text(MANUAL_LOOP)
    plain = subprocess.run(
        [sys.executable, "manual.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    env = {**os.environ, CORE_ENV: core, "COLUMNS": "200"}
    traced = gradtrace("run", "--out", "run", "manual.py", cwd=tmp_path, env=env)
    assert plain.returncode == traced.returncode == 0, traced.stderr
    assert traced.stdout == plain.stdout  # training unchanged, bit for bit
    assert "5 steps (counted by backward passes: no optimizer stepped)" in traced.stderr
    assert "gradient health" in traced.stderr
    report = json.loads(gradtrace("report", "run", "--json", cwd=tmp_path).stdout)
    assert (report["run"]["steps"], report["run"]["steps_counted_by"]) == (5, "backward")
    expected = json.loads(plain.stdout)["norms"]
    params = report["grad_stats"]["params"]
    assert set(params) == set(expected[0])
    for name, entry in params.items():
        # Recorded as each backward pass ends: before clipping, as the script read them.
        assert [step for step, _ in entry["grad_norm"]] == [0, 1, 2, 3, 4]
        by_step = [norm for _, norm in entry["grad_norm"]]
        assert by_step == pytest.approx([norms[name] for norms in expected], rel=1e-6)
    assert set(report["grad_stats"]["modules"]) == {"0", "2"}
    # The loop clips after the pass ended: no recorded gradient was clipped, none is claimed.
    assert report["grad_stats"]["global_grad_norm_before_clip"] == []
    assert "clip_grad_norm_" not in traced.stderr
    assert report["findings"] == []


def _accumulating(tmp_path: Path, *, micro_batches: int, core: str) -> Session:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with Session(tmp_path / "run", core=core) as session:
        for _ in range(3):
            for _ in range(micro_batches):
                model(torch.randn(16, 4)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    return session


@pytest.mark.parametrize("core", CORES)
def test_gradient_accumulation_with_an_optimizer_stays_one_step_per_optimizer_step(
    tmp_path: Path, core: str
) -> None:
    session = _accumulating(tmp_path, micro_batches=4, core=core)
    run = load_run(tmp_path / "run")
    assert session.step == run.steps == 3
    assert [stats.step for stats in run.grad_steps] == [0, 1, 2]
    assert {stats.optimizer for stats in run.grad_steps} == {"SGD.step"}
    assert run.meta["steps_counted_by"] == "optimizer"


def test_the_grad_norms_of_a_backward_step_are_the_gradients_it_produced(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    # Another model's optimizer, alive in the process (a notebook's, an earlier test's):
    # it steps none of these parameters, so backward passes still count the steps.
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    seen = []
    with Session(tmp_path / "run"):
        for _ in range(3):
            model.zero_grad()
            model(torch.randn(16, 4)).square().mean().backward()
            seen.append({n: p.grad.norm().item() for n, p in model.named_parameters()})
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
    run = load_run(tmp_path / "run")
    assert run.steps == 3 and other.param_groups
    for stats, expected in zip(run.grad_steps, seen, strict=True):
        assert stats.optimizer == "backward"
        assert {p.name: p.grad_norm for p in stats.params} == pytest.approx(expected, rel=1e-6)
