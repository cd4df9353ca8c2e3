"""Module paths: what `named_modules()` calls a module from the model, however it is called."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gradtrace.session import Session


def gated() -> nn.Sequential:
    # Sigmoid saves its output; the in-place ReLU right after it corrupts it.
    return nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.ReLU(inplace=True), nn.Linear(4, 1))


def culprit_module(tmp_path: Path, run) -> str:
    session = Session(tmp_path / "run")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"), session:
        run()
    [finding] = session.findings
    return finding.module


def test_throwaway_containers_keep_the_models_paths(tmp_path: Path) -> None:
    model = gated()

    def run() -> None:
        with torch.no_grad():
            model(torch.randn(2, 4))  # the whole model runs once: its paths are known
        model[2:](model[:2](torch.randn(2, 4))).sum().backward()  # new containers each call

    assert culprit_module(tmp_path, run) == "2"


def test_part_called_first_gets_full_paths_when_the_model_runs(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), gated())

    def run() -> None:
        with torch.no_grad():
            model[1](torch.randn(2, 4))  # a part alone first: it is a root for now
        model(torch.randn(2, 4)).sum().backward()

    assert culprit_module(tmp_path, run) == "1.2"


def test_model_argument_names_paths_before_anything_runs(tmp_path: Path) -> None:
    model = gated()
    session = Session(tmp_path / "run", model=model)
    with pytest.raises(RuntimeError), session:
        model[2:](model[:2](torch.randn(2, 4))).sum().backward()
    assert [f.module for f in session.findings] == ["2"]
