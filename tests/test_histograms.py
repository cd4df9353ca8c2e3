"""Gradient value histograms (--grad-histograms): exact counts, read back everywhere."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import gradtrace
from gradtrace.analysis.report import build_report
from gradtrace.events import HISTOGRAM_EDGES
from gradtrace.probes import histograms as histograms_probe
from gradtrace.reporters.json_report import render_json
from gradtrace.session import Session
from gradtrace.store.reader import load_run


def _train(steps: int, expected: dict[int, dict[str, list[int]]] | None = None) -> list[float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    edges = torch.tensor(HISTOGRAM_EDGES)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = model(torch.randn(8, 6) * 10.0 ** (step - 2)).square().mean()
        loss.backward()
        if expected is not None:
            expected[step] = {
                name: torch.bucketize(p.grad.reshape(-1), edges, right=True)
                .bincount(minlength=len(HISTOGRAM_EDGES) + 1)
                .tolist()
                for name, p in model.named_parameters()
            }
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_counts_match_bucketize_every_nth_step_and_training_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(histograms_probe, "CHUNK_ELEMENTS", 7)  # several chunks per weight
    plain = _train(5)
    expected: dict[int, dict[str, list[int]]] = {}
    with gradtrace.trace(out=tmp_path / "run", grad_histograms=2, tensorboard=True):
        traced = _train(5, expected)
    assert traced == plain
    run = load_run(tmp_path / "run")
    got = {(h.step, h.param): list(h.counts) for h in run.grad_histograms}
    assert sorted({step for step, _ in got}) == [0, 2, 4]
    for (step, param), counts in got.items():
        assert counts == expected[step][param], (step, param)
    assert run.meta["histogram_edges"] == list(HISTOGRAM_EDGES)
    report = render_json(build_report(run))["grad_stats"]["value_histograms"]
    assert report["params"]["0.weight"][1] == [2, expected[2]["0.weight"]]

    events = EventAccumulator(
        str(tmp_path / "run" / "tensorboard"), size_guidance={"histograms": 0}
    )
    events.Reload()
    shown = events.Histograms("grad_values/0/weight")
    assert [event.step for event in shown] == [0, 2, 4]
    assert all(event.histogram_value.num == 16 * 6 for event in shown)
    assert list(shown[1].histogram_value.bucket) == expected[2]["0.weight"]


def test_off_by_default(tmp_path: Path) -> None:
    with Session(tmp_path / "run"):
        _train(2)
    run = load_run(tmp_path / "run")
    assert run.grad_histograms == [] and "histogram_edges" not in run.meta


def test_non_contiguous_gradients_are_counted_slice_by_slice(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(6, 4).t())  # a transposed view: its gradient too
    optimizer = torch.optim.SGD([weight], lr=0.1)
    with Session(tmp_path / "run", grad_histograms=1):
        (torch.randn(3, 4) @ weight).square().sum().backward()
        assert not weight.grad.is_contiguous()
        expected = torch.bucketize(
            weight.grad.reshape(-1), torch.tensor(HISTOGRAM_EDGES), right=True
        )
        torch.set_warn_always(True)  # torch warns once per process otherwise
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # gradtrace's own ops must not warn the user
                optimizer.step()
        finally:
            torch.set_warn_always(False)
    (histogram,) = load_run(tmp_path / "run").grad_histograms
    assert list(histogram.counts) == expected.bincount(minlength=len(HISTOGRAM_EDGES) + 1).tolist()
