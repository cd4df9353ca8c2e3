"""A model that learns nothing: every gradient exactly zero on every recorded step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cores import CORES
from torch import nn

from gradtrace.analysis.grad_health import diagnose_gradients
from gradtrace.events import ParamStat, StepGradStats
from gradtrace.session import Session

ALL_ZERO = "all-gradients-zero"


class Classifier(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def train(tmp_path: Path, classes: int, core: str) -> Session:
    torch.manual_seed(0)
    model = Classifier(classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Session(tmp_path / "run", core=core) as session:
        for _ in range(4):
            x, target = torch.randn(16, 4), torch.zeros(16, dtype=torch.long)
            loss = F.cross_entropy(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return session


@pytest.mark.parametrize("core", CORES)
def test_cross_entropy_on_a_one_output_head_is_reported(tmp_path: Path, core: str) -> None:
    session = train(tmp_path, classes=1, core=core)
    (finding,) = session.findings
    assert finding.kind == ALL_ZERO
    assert "exactly zero at all 4 recorded steps" in finding.message
    assert "1-output head" in finding.hint
    assert finding.module == "Classifier"
    assert finding.file is not None and finding.file.endswith("test_all_zero.py")
    assert finding.details == {"recorded_steps": 4, "parameters": 4}


@pytest.mark.parametrize("core", CORES)
def test_a_model_that_learns_is_silent(tmp_path: Path, core: str) -> None:
    assert train(tmp_path, classes=3, core=core).findings == []


def test_a_few_zero_gradients_stay_the_no_grad_finding() -> None:
    def step(i: int) -> StepGradStats:
        params = (
            ParamStat("fc.weight", "fc", 8, 0.5, 1.0, 0.0, 0),
            ParamStat("fc.bias", "fc", 1, 0.0, 1.0, 1.0, 1),
        )
        return StepGradStats(i, "SGD.step", params, (), (), (), ())

    assert [f.kind for f in diagnose_gradients([step(i) for i in range(3)], {})] == ["no-grad"]
    # One recorded step is not yet evidence that nothing learns.
    zero = StepGradStats(
        0, "SGD.step", (ParamStat("fc.bias", "fc", 1, 0.0, 1.0, 1.0, 0),), (), (), (), ()
    )
    assert diagnose_gradients([zero], {}) == []
