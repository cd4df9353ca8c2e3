"""Graph cuts by read-out (issue 15, item 7): the line where a value left the graph.

REINFORCE written with `log_prob.item()` builds its loss from Python numbers: the policy
never gets a gradient and nothing is raised. Logging with `.item()` must stay silent.
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


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.logits = nn.Linear(8, 3)

    def forward(self, obs: torch.Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self.logits(torch.tanh(self.body(obs))))


def _reinforce_with_item() -> None:
    policy = Policy()
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(2):
        log_probs = []
        for _ in range(4):
            dist = policy(torch.randn(1, 4))
            action = dist.sample()
            log_probs.append(dist.log_prob(action).item())
        ret = 1.0
        loss = torch.tensor(-sum(lp * ret for lp in log_probs), requires_grad=True)
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


@pytest.mark.parametrize("core", CORES)
def test_item_that_builds_the_loss_is_a_graph_cut(tmp_path: Path, core: str) -> None:
    findings = [f for f in _findings(tmp_path, core, _reinforce_with_item) if f.kind == "graph-cut"]
    assert len(findings) == 1, [f.message for f in findings]
    [finding] = findings
    assert (finding.file, finding.line) == (
        __file__,
        _line_of(_reinforce_with_item, "log_prob(action).item()"),
    )
    assert finding.op == "_local_scalar_dense"
    assert finding.module == "training loop"
    assert sorted(finding.details["parameters"]) == [
        "body.bias",
        "body.weight",
        "logits.bias",
        "logits.weight",
    ]
    assert "read a value out of the graph" in finding.message


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")
@pytest.mark.parametrize("core", CORES)
def test_logging_terms_of_the_loss_stays_silent(tmp_path: Path, core: str) -> None:
    assert _findings(tmp_path, core, _reinforce_with_logging) == []
