"""Graph cuts by read-out (issue 15, item 7): the line where a value left the graph.

REINFORCE written with `log_prob.item()`, `.detach().numpy()` or `torch.tensor(log_prob)`
builds its loss from copies: the policy never gets a gradient and nothing is raised.
Logging with `.item()` and detaching a target must stay silent, and a detached graph is
freed when the program drops it, as without gradtrace.
"""

from __future__ import annotations

import functools
import gc
import inspect
import weakref
from collections.abc import Callable
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


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.logits = nn.Linear(8, 3)

    def forward(self, obs: torch.Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self.logits(torch.tanh(self.body(obs))))


def _as_item(log_prob: torch.Tensor) -> float:
    return log_prob.item()


def _as_numpy(log_prob: torch.Tensor) -> float:
    return float(log_prob.detach().numpy()[0])


def _reinforce_from_numbers(read_out: Callable[[torch.Tensor], float]) -> None:
    """REINFORCE whose loss is rebuilt as a new leaf from log-probabilities read out."""
    policy = Policy()
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(2):
        log_probs = []
        for _ in range(4):
            dist = policy(torch.randn(1, 4))
            log_probs.append(read_out(dist.log_prob(dist.sample())))
        ret = 1.0
        loss = torch.tensor(-sum(lp * ret for lp in log_probs), requires_grad=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _reinforce_rewrapped() -> None:
    policy = Policy()
    baseline = nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.Adam([*policy.parameters(), baseline], lr=1e-2)
    for _ in range(2):
        log_probs = []
        for _ in range(4):
            dist = policy(torch.randn(1, 4))
            log_probs.append(torch.tensor(dist.log_prob(dist.sample())))
        loss = -(torch.cat(log_probs).sum() * (1.0 - baseline))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _reinforce_with_logging() -> None:
    policy = Policy()
    critic = nn.Linear(4, 1)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    critic_optimizer = torch.optim.SGD(critic.parameters(), lr=1e-2)
    for _ in range(2):
        obs = torch.randn(6, 4)
        dist = policy(obs)
        log_prob = dist.log_prob(dist.sample())
        entropy = dist.entropy().mean()
        value = critic(obs).squeeze(-1)
        advantage = 1.0 - value.detach()
        policy_loss = -(log_prob * advantage).mean() - 0.01 * entropy
        value_loss = (1.0 - value).pow(2).mean()
        # Logging: each of these is a term of a loss that is backpropagated.
        logged = [policy_loss.item(), entropy.item(), float(value_loss), value.mean().item()]
        assert len(logged) == 4
        critic_optimizer.zero_grad()
        value_loss.backward()
        critic_optimizer.step()
        optimizer.zero_grad()
        policy_loss.backward()
        optimizer.step()


def _findings(tmp_path: Path, core: str, run) -> list:
    torch.manual_seed(0)
    with Session(tmp_path / "run", core=core, trace_steps="none") as session:
        run()
    return session.findings


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")
@pytest.mark.parametrize("core", CORES)
def test_logging_terms_of_the_loss_stays_silent(tmp_path: Path, core: str) -> None:
    assert _findings(tmp_path, core, _reinforce_with_logging) == []


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize(
    ("run", "where", "text", "op", "words"),
    [
        (
            functools.partial(_reinforce_from_numbers, _as_item),
            _as_item,
            ".item()",
            "_local_scalar_dense",
            "as a Python",
        ),
        (
            functools.partial(_reinforce_from_numbers, _as_numpy),
            _as_numpy,
            ".detach().numpy()",
            "detach",
            "as a detached copy",
        ),
        (
            _reinforce_rewrapped,
            _reinforce_rewrapped,
            "torch.tensor(dist.log_prob",
            "detach",
            "as a detached copy",
        ),
    ],
    ids=["item", "detach-numpy", "torch-tensor"],
)
def test_a_copy_that_builds_the_loss_is_a_graph_cut(
    tmp_path: Path, core: str, run, where, text: str, op: str, words: str
) -> None:
    findings = [f for f in _findings(tmp_path, core, run) if f.kind == "graph-cut"]
    assert len(findings) == 1, [f.message for f in findings]
    [finding] = findings
    assert (finding.file, finding.line) == (__file__, _line_of(where, text))
    assert (finding.op, finding.module) == (op, "training loop")
    assert sorted(finding.details["parameters"]) == [
        "body.bias",
        "body.weight",
        "logits.bias",
        "logits.weight",
    ]
    assert words in finding.message


class _Marked(torch.autograd.Function):
    """Identity whose autograd node holds `marker`: the marker lives as long as the node."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, marker: object) -> torch.Tensor:
        ctx.marker = marker
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _Marker:
    pass


# The line of the test below where the teacher's output is detached.
_TEACHER_CUT = "target = _Marked.apply"


@pytest.mark.parametrize("core", CORES)
def test_a_detached_graph_is_freed_when_the_program_drops_it(tmp_path: Path, core: str) -> None:
    """Distillation with a teacher called without no_grad: its graph dies at `.detach()`."""
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    optimizer = torch.optim.SGD([*teacher.parameters(), *student.parameters()], lr=0.1)
    with Session(tmp_path / "run", core=core, trace_steps="none") as session:
        for _ in range(2):
            x = torch.randn(8, 4)
            marker = _Marker()
            alive = weakref.ref(marker)
            target = _Marked.apply(teacher(x), marker).detach()
            del marker
            gc.collect()
            assert alive() is None, "gradtrace kept the teacher's graph alive"
            loss = (student(x) - target).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    # The optimizer holds the teacher, which never trains: the cut is named, not hidden.
    [cut] = [f for f in session.findings if f.kind == "graph-cut"]
    test = test_a_detached_graph_is_freed_when_the_program_drops_it
    assert cut.line == _line_of(test, _TEACHER_CUT)
