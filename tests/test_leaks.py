"""Sessions must not keep the user's tensors or graphs alive, nor grow without bound."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from cores import CORES
from torch import nn

from gradtrace.session import Session


def test_graph_without_backward_is_freed(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))
    with Session(tmp_path / "run"):
        hidden = model[1](model[0](torch.randn(4, 8)))  # sigmoid saves its output
        loss = model[2](hidden).sum()  # ...and backward never runs
        watched = weakref.ref(hidden)
        del hidden, loss
        gc.collect()
        assert watched() is None


@pytest.mark.parametrize("core", CORES)
def test_live_registry_empties_after_each_backward(tmp_path: Path, core: str) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    session = Session(tmp_path / "run", core=core)
    with session:
        for _ in range(50):
            loss = model(torch.randn(4, 8)).square().mean()
            assert session.live_saved_count()  # the graph's saved tensors, until backward
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            # Between steps no saved tensor may stay registered (the write log's own count).
            assert session.live_saved_count() == 0
    assert session.step == 50


def test_no_hooks_pile_up_on_a_leaf_passed_through_a_parameter_free_module(
    tmp_path: Path,
) -> None:
    weight = nn.Parameter(torch.randn(4))
    identity = nn.Identity()
    optimizer = torch.optim.SGD([weight], lr=0.1)
    with Session(tmp_path / "run"):
        for _ in range(5):
            loss = (identity(weight) * 2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert not weight._backward_hooks


def test_parameter_hooks_added_during_the_run_are_removed_at_close(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # a second session on the same model must not add to the first's
        with Session(tmp_path / f"run{_}"):
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()
        assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
