"""float64 and complex models are traced like any other (issue 18).

pytorch/examples' time_sequence_prediction (two LSTMCells in float64, LBFGS with a closure)
exited 1 under `gradtrace run`: gradient norms were asked for in float32, which torch refuses
for float64 (narrowing) and complex input.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

from gradtrace.probes.grads import norm_into, sum_into
from gradtrace.session import Session
from gradtrace.store.reader import load_run

# time_sequence_prediction, shrunk: two float64 LSTMCells and a Tanh, LBFGS with a closure.
SEQUENCE = """
import torch
from torch import nn

torch.manual_seed(0)


class Sequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm1 = nn.LSTMCell(1, 8)
        self.lstm2 = nn.LSTMCell(8, 8)
        self.squash = nn.Tanh()
        self.linear = nn.Linear(8, 1)

    def forward(self, input):
        h_t = c_t = h_t2 = c_t2 = torch.zeros(input.size(0), 8, dtype=torch.double)
        outputs = []
        for input_t in input.split(1, dim=1):
            h_t, c_t = self.lstm1(input_t, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            outputs.append(self.linear(self.squash(h_t2)))
        return torch.cat(outputs, dim=1)


data = torch.sin(torch.arange(60, dtype=torch.double).reshape(4, 15) / 3)
model = Sequence().double()
optimizer = torch.optim.LBFGS(model.parameters(), lr=0.8)
for i in range(3):
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(data[:, :-1]), data[:, 1:])
        loss.backward()
        return loss
    print(i, optimizer.step(closure).item().hex())
"""


def test_float64_lstm_with_lbfgs_runs_under_the_cli_as_under_python(tmp_path: Path) -> None:
    (tmp_path / "sequence.py").write_text(textwrap.dedent(SEQUENCE))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )

    plain = run("sequence.py")
    traced = run("-m", "gradtrace", "run", "--out", "run", "sequence.py")
    assert plain.returncode == traced.returncode == 0, traced.stderr
    assert traced.stdout == plain.stdout  # the same losses, to the last bit
    assert "probe failed" not in traced.stderr
    run_ = load_run(tmp_path / "run")
    assert run_.probe_failures == []
    assert run_.steps == 3
    norms = [
        stat.grad_norm
        for step in run_.grad_steps
        for stat in step.params
        if stat.name == "lstm1.weight_hh"
    ]
    assert len(norms) == 3 and all(math.isfinite(n) and n > 0 for n in norms), norms
    # The Tanh is parameter-free: the norm of the float64 gradient at its output, step 0.
    assert dict(run_.grad_steps[0].output_grad_norms)["squash"] > 0


class ComplexModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 4, dtype=torch.cfloat)
        self.keep = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.keep(self.mix(x))


def train_complex() -> tuple[list[torch.Tensor], list[float]]:
    torch.manual_seed(0)
    model = ComplexModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(5, 4, dtype=torch.cfloat, generator=torch.Generator().manual_seed(2))
    losses, weight_grad_norms = [], []
    for _ in range(3):
        loss = model(x).abs().square().mean()
        loss.backward()
        weight_grad_norms.append(torch.linalg.vector_norm(model.mix.weight.grad).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return [*losses, *model.parameters()], weight_grad_norms


def test_complex_parameters_are_traced(tmp_path: Path) -> None:
    plain, plain_norms = train_complex()
    with Session(tmp_path / "run", update_ratio=True, grad_histograms=1) as session:
        traced, _ = train_complex()
    for a, b in zip(plain, traced, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert session.probe_failures == []
    run = load_run(tmp_path / "run")
    norms = [s.grad_norm for step in run.grad_steps for s in step.params if s.name == "mix.weight"]
    assert len(norms) == 3
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(norms, plain_norms, strict=True))
    updates = [
        s.update_norm for step in run.grad_steps for s in step.params if s.name == "mix.weight"
    ]
    assert all(math.isfinite(u) and u > 0 for u in updates), updates
    assert dict(run.grad_steps[0].output_grad_norms)["keep"] > 0
    weight_counts = [h.counts for h in run.grad_histograms if h.param == "mix.weight"]
    assert len(weight_counts) == 3 and all(sum(c) == 16 for c in weight_counts)


def test_float64_sums_and_norms_keep_their_range() -> None:
    """A float64 output summing past float32's range is finite; Inf and NaN are not."""
    slot = torch.empty((), dtype=torch.float32)
    sum_into(torch.full((4,), 1e300, dtype=torch.float64), slot)
    assert math.isfinite(slot.item())
    sum_into(torch.tensor([1.0, math.inf], dtype=torch.float64), slot)
    assert not math.isfinite(slot.item())
    sum_into(torch.tensor([1.0, math.nan], dtype=torch.float64), slot)
    assert not math.isfinite(slot.item())
    norm_into(torch.tensor([3.0, 4.0], dtype=torch.float64), slot)
    assert slot.item() == 5.0
    norm_into(torch.tensor([3 + 4j], dtype=torch.cfloat), slot)
    assert slot.item() == 5.0
