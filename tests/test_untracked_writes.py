"""Writes autograd does not record, into values the gradients depend on (issue 15, item 3).

A write through `.detach()` or `.data` into a module's output inside a forward, before
anything saved it, leaves no version to check: backward treats it as identity and the
gradients are silently wrong. A parameter written under no_grad inside a forward misses
that op in its gradient. Their legal look-alikes (updates between steps, clipping, EMA,
BatchNorm statistics, spectral norm's vectors) must stay silent.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from cores import CORES
from torch import nn

from gradtrace.session import Session


def _line_of(function: object, text: str) -> int:
    lines, start = inspect.getsourcelines(function)
    [offset] = [n for n, line in enumerate(lines) if text in line]
    return start + offset


class MaskedEncoder(nn.Module):
    """Zeroes some features of a submodule's output through `.detach()`."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        h.detach()[:, :2] = 0.0
        return self.head(h)


class DataScaled(nn.Module):
    """Scales a submodule's output through `.data`."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        h.data.mul_(0.5)
        return self.head(torch.tanh(h))


class RenormInForward(nn.Module):
    """Renormalises its weight in place under no_grad right before using it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.proj.weight.div_(self.proj.weight.norm())
        return self.proj(x)


def _train(model: nn.Module, steps: int = 2) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        loss = model(torch.randn(4, 6)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _findings(tmp_path: Path, core: str, run) -> list:
    torch.manual_seed(0)
    with Session(tmp_path / "run", core=core, trace_steps="none") as session:
        run()
    return session.findings


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize(
    ("model", "write", "op"),
    [
        (MaskedEncoder, "h.detach()[:, :2] = 0.0", "fill_"),
        (DataScaled, "h.data.mul_(0.5)", "mul_"),
    ],
)
def test_untracked_write_into_an_output_is_a_silent_overwrite(
    tmp_path: Path, core: str, model: type[nn.Module], write: str, op: str
) -> None:
    [finding] = _findings(tmp_path, core, lambda: _train(model()))
    assert finding.kind == "silent-overwrite"
    assert (finding.file, finding.line, finding.op) == (
        __file__,
        _line_of(model.forward, write),
        op,
    )
    assert finding.module == model.__name__
    assert finding.details["output_of"] == "encoder"
    assert "silently overwrote the output of encoder" in finding.message


@pytest.mark.parametrize("core", CORES)
def test_parameter_written_under_no_grad_in_forward_is_a_warning(tmp_path: Path, core: str):
    [finding] = _findings(tmp_path, core, lambda: _train(RenormInForward()))
    assert finding.kind == "no-grad-parameter-write"
    assert finding.parameter == "proj.weight"
    assert finding.op == "div_"
    assert finding.line == _line_of(RenormInForward.forward, "weight.div_(")
    assert finding.details["level"] == "warning"


class Legal(nn.Module):
    """Everything here writes in place and none of it is a bug."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.utils.spectral_norm(nn.Linear(6, 8))
        self.norm = nn.BatchNorm1d(8)
        self.embed = nn.Embedding(10, 8, max_norm=1.0)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(x)) + self.embed(torch.arange(x.shape[0]) % 10)
        h[:, 0] = 0.0  # tracked by autograd: legal
        h = torch.relu(h)
        return self.head(h)


def _legal_training() -> None:
    model = Legal()
    ema = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        out = model(torch.randn(4, 6))
        loss = out.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for shadow, p in zip(ema, model.parameters(), strict=True):
                shadow.mul_(0.9).add_(p, alpha=0.1)
        model.head.weight.data.clamp_(-1.0, 1.0)
        metrics = out.detach()
        metrics[metrics < 0] = 0.0


@pytest.mark.parametrize("core", CORES)
def test_legal_look_alikes_stay_silent(tmp_path: Path, core: str) -> None:
    assert _findings(tmp_path, core, _legal_training) == []
