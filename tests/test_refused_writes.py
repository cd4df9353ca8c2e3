"""In-place writes autograd refuses at the write itself become findings; the error is PyTorch's."""

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

import gradtrace as gt
from gradtrace._native import CORE_ENV
from gradtrace.analysis.refused import (
    CUSTOM_FUNCTION_VIEW,
    INFERENCE_TENSOR,
    LEAF,
    MULTIPLE_VIEWS,
    NO_GRAD_VIEW,
    VIEW_OF_LEAF,
    refused_check,
)
from gradtrace.session import Session

REFUSED = "inplace-refused"

MANUAL_SGD = """\
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
lr = 0.1
for step in range(3):
    loss = model(torch.randn(16, 4)).square().mean()
    model.zero_grad()
    loss.backward()
    for p in model.parameters():
        p.add_(p.grad, alpha=-lr)  # the write
"""


def _line_of(source: str, marker: str) -> int:
    return next(n for n, text in enumerate(source.splitlines(), 1) if marker in text)


@pytest.mark.parametrize("core", CORES)
def test_hand_written_sgd_outside_no_grad_is_a_finding_in_every_report(
    tmp_path: Path, core: str
) -> None:
    script = tmp_path / "manual_sgd.py"
    script.write_text(MANUAL_SGD)
    plain = subprocess.run(
        [sys.executable, "manual_sgd.py"], cwd=tmp_path, capture_output=True, text=True
    )
    env = {**os.environ, CORE_ENV: core}
    traced = gradtrace("run", "--out", "run", "manual_sgd.py", cwd=tmp_path, env=env)
    # PyTorch's exception, unchanged: type, text and exit code.
    error = (
        "RuntimeError: a leaf Variable that requires grad is being used in an in-place operation."
    )
    assert plain.returncode == traced.returncode == 1
    assert error in plain.stderr and error in traced.stderr
    # The summary names it.
    assert "in-place write refused by autograd" in traced.stderr
    report = json.loads(gradtrace("report", "run", "--json", cwd=tmp_path).stdout)
    assert report["run"]["exception"]["message"] == error.split(": ", 1)[1]
    (finding,) = report["findings"]
    assert finding["kind"] == REFUSED
    assert (finding["file"], finding["line"]) == (str(script), _line_of(MANUAL_SGD, "the write"))
    assert (finding["op"], finding["module"], finding["phase"]) == ("add_", "training loop", "loop")
    assert finding["details"]["check"] == LEAF
    assert "torch.no_grad()" in finding["hint"]
    html = tmp_path / "report.html"
    assert gradtrace("report", "run", "--html", str(html), cwd=tmp_path).returncode == 0
    page = html.read_text()
    assert "in-place write refused by autograd" in page and "manual_sgd.py:12" in page


class Actor(nn.Module):
    """Its log-probability calls `self(x)`: the forward runs through a method, not `__call__`."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, log_std = self.net(x).chunk(2, dim=-1)
        log_std.clamp_(-5, 2)  # refused: an output of chunk()
        return mean - log_std.exp()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).sum(-1)


class PromptModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.zeros(4))
        self.body = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.prompt += x.mean(0)  # refused: a parameter written inside forward
        return self.body(x + self.prompt)


class Agent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.actor = Actor()
        self.prompted = PromptModel()


def _raised(run: object) -> RuntimeError:
    with pytest.raises(RuntimeError) as raised:
        run()
    return raised.value


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize(
    ("call", "marker", "module", "op", "check"),
    [
        (lambda a, x: a.actor.log_prob(x), "log_std.clamp_", "actor", "clamp_", MULTIPLE_VIEWS),
        (lambda a, x: a.prompted(x), "self.prompt +=", "prompted", "add_", LEAF),
    ],
    ids=["chunk-view-via-method", "parameter-in-forward"],
)
def test_the_finding_names_line_module_and_op_and_the_error_is_unchanged(
    tmp_path: Path, core: str, call, marker: str, module: str, op: str, check: str
) -> None:
    torch.manual_seed(0)
    agent, x = Agent(), torch.randn(8, 4)
    untraced = _raised(lambda: call(agent, x))
    session = Session(tmp_path / "run", model=agent, core=core)
    with pytest.raises(RuntimeError) as raised, session:
        call(agent, x)
    assert type(raised.value) is type(untraced) and str(raised.value) == str(untraced)
    (finding,) = session.findings
    source = Path(__file__).read_text()
    assert finding.kind == REFUSED
    assert (finding.file, finding.line) == (__file__, _line_of(source, marker))
    assert (finding.module, finding.op, finding.phase) == (module, op, "forward")
    assert finding.details["check"] == check
    assert f"in {module} ({op}) wrote in place" in finding.message
    assert gt.load_run(tmp_path / "run").findings[0].finding == finding


def _custom_view() -> None:
    class Same(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor) -> torch.Tensor:
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
            return grad

    Same.apply(torch.randn(3, requires_grad=True) * 2).add_(1)


def _no_grad_view() -> None:
    x = torch.randn(4, requires_grad=True) * 2
    with torch.no_grad():
        view = x[:2]
    view.mul_(2)


def _inference() -> None:
    with torch.inference_mode():
        t = torch.randn(3)
    t.add_(1)


def _view_of_leaf() -> None:
    nn.Parameter(torch.randn(3))[0] = 1


@pytest.mark.parametrize(
    ("write", "check"),
    [
        (_custom_view, CUSTOM_FUNCTION_VIEW),
        (_no_grad_view, NO_GRAD_VIEW),
        (_inference, INFERENCE_TENSOR),
        (_view_of_leaf, VIEW_OF_LEAF),
    ],
)
def test_every_view_and_leaf_check_is_recognised_in_torchs_own_words(
    tmp_path: Path, write, check: str
) -> None:
    assert refused_check(str(_raised(write)))[0] == check
    with pytest.raises(RuntimeError), gt.trace(out=tmp_path / "run") as trace:
        write()
    (finding,) = trace.findings
    assert (finding.kind, finding.details["check"]) == (REFUSED, check)
    assert finding.op == ("__setitem__" if check == VIEW_OF_LEAF else finding.op)
    assert finding.line is not None


def test_other_errors_are_no_finding(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), gt.trace(out=tmp_path / "run") as trace:
        torch.randn(2, 3) @ torch.randn(2, 3)
    assert trace.findings == []
