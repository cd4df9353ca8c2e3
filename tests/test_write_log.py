"""The write log steps aside for plain optimizer steps with nothing to corrupt, and only then."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cores import CORES
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from gradtrace import _native
from gradtrace.probes.writes import _WriteLogMode
from gradtrace.session import Session
from gradtrace.store.reader import load_run


def _write_log_on() -> bool:
    python_mode = any(
        isinstance(mode, _WriteLogMode) for mode in _get_current_dispatch_mode_stack()
    )
    return python_mode or _native.observing()


class Spy(torch.optim.SGD):
    """SGD that notes whether the write log saw its update, and can fail once."""

    def __init__(self, params, fail_at: int | None = None) -> None:
        super().__init__(params, lr=0.1)
        self.seen: list[bool] = []
        self._fail_at = fail_at

    def step(self, closure=None):
        self.seen.append(_write_log_on())
        if len(self.seen) - 1 == self._fail_at:
            raise RuntimeError("update failed")
        return super().step(closure)


@pytest.mark.parametrize("core", CORES)
def test_a_plain_step_after_backward_is_not_logged_one_before_backward_is(
    tmp_path: Path, core: str
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    optimizer = Spy(model.parameters())
    # No timeline: a step chosen for trace.json logs every write, plain steps included.
    with Session(tmp_path / "run", level="full", trace_steps="none", core=core) as session:
        assert session.core == core
        loss = model(torch.randn(2, 4)).sum()
        loss.backward()
        optimizer.step()  # the graph is freed: nothing to corrupt
        assert _write_log_on()
        loss = model(torch.randn(2, 4)).sum()
        loss.backward(retain_graph=True)
        optimizer.step()  # the graph's saved tensors are still live
    assert optimizer.seen == [False, True]
    counts = {(owner, op): n for owner, op, _, n in load_run(tmp_path / "run").write_counts}
    assert counts[("Spy.step", "add_")] == 4  # one update of 4 parameters


@pytest.mark.parametrize("core", CORES)
def test_the_write_log_is_back_for_the_forward_after_a_step_that_raised(
    tmp_path: Path, core: str
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 1))
    optimizer = Spy(model.parameters(), fail_at=0)
    session = Session(tmp_path / "run", level="full", core=core)
    with session:
        model(torch.randn(2, 4)).sum().backward()
        with pytest.raises(RuntimeError, match="update failed"):
            optimizer.step()
        h = model[1](model[0](torch.randn(2, 4)))
        h.mul_(2)  # overwrites what sigmoid saved
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            model[2](h).sum().backward()
    [finding] = session.findings
    assert (finding.op, finding.code) == ("mul_", "h.mul_(2)  # overwrites what sigmoid saved")
