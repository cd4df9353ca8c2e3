"""torch.compile under gradtrace: light keeps compilation, full runs eagerly and says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gradtrace.session import Session
from gradtrace.store import load_run


class Gate(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(torch.sigmoid(self.fc(x)))  # relu_ on sigmoid's saved output if inplace


def train(backend: str, *, inplace: bool = False, steps: int = 3) -> list[str]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), Gate(inplace), nn.Linear(8, 1))
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        loss = compiled(torch.randn(4, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(f"{loss.item():.6f}")
    return losses


@pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)`")
def test_light_level_keeps_inductor_and_the_losses(tmp_path: Path) -> None:
    torch._dynamo.reset()
    plain = train("inductor")
    torch._dynamo.reset()
    with Session(tmp_path / "run", level="light") as session:
        traced = train("inductor")
    assert traced == plain
    assert session.findings == []
    assert load_run(tmp_path / "run").meta["notices"] == []


@pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)`")
def test_full_level_runs_compiled_modules_eagerly_and_says_so(tmp_path: Path) -> None:
    torch._dynamo.reset()
    plain = train("aot_eager")
    with Session(tmp_path / "run", level="full") as session:
        traced = train("aot_eager")
    assert traced == plain
    assert session.findings == []
    [notice] = load_run(tmp_path / "run").meta["notices"]
    assert "ran eagerly" in notice and "--level light" in notice


@pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)`")
def test_full_level_names_paths_without_orig_mod(tmp_path: Path) -> None:
    torch._dynamo.reset()
    session = Session(tmp_path / "run", level="full")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"), session:
        train("aot_eager", inplace=True, steps=1)
    [finding] = session.findings
    assert (finding.module, finding.op) == ("1.act", "relu_")
    assert finding.saved_by["module"] == "1"
