"""Run options are declared once: the command line, the API and the ranks' argv agree."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

import gradtrace
from gradtrace.cli import run
from gradtrace.options import RunOptions
from gradtrace.session import Session

# One value other than the default for every field: a field added without one fails
# `test_every_field_has_a_sample`, so no option can skip the round trip below.
SAMPLES: dict[str, list[Any]] = {
    "level": ["light"],
    "every": [3],
    "update_ratio": [True],
    "grad_histograms": [2],
    "trace_steps": ["none", "1,4-6", [0, 7]],
    "tensorboard": [True, Path("logs/tb")],
    "check_ranks": [True],
}
SCRIPT = ("train.py", "--lr", "3", "--level", "x")


def parsed(argv: list[str]) -> tuple[RunOptions, tuple[str, ...]]:
    """What `gradtrace run ARGV` makes of its arguments: the options and the script's argv."""
    context = run.make_context("run", argv)
    return RunOptions.from_cli(context.params), context.params["args"]


def test_every_field_has_a_sample() -> None:
    assert set(SAMPLES) == {item.name for item in dataclasses.fields(RunOptions)}
    for item in dataclasses.fields(RunOptions):
        assert all(RunOptions.of(**{item.name: v}) != RunOptions() for v in SAMPLES[item.name])


@pytest.mark.parametrize(
    ("name", "value"), [(name, value) for name, values in SAMPLES.items() for value in values]
)
def test_each_option_survives_the_ranks_command_line(name: str, value: Any) -> None:
    # `gradtrace run --nproc-per-node N` starts each rank with options.to_argv().
    options = RunOptions.of(**{name: value})
    assert parsed([*options.to_argv(), *SCRIPT]) == (options, SCRIPT)


def test_all_options_together_and_the_defaults_survive_it() -> None:
    together = RunOptions.of(**{name: values[-1] for name, values in SAMPLES.items()})
    for options in (together, RunOptions()):
        assert parsed([*options.to_argv(), *SCRIPT]) == (options, SCRIPT)
    assert parsed(list(SCRIPT)) == (RunOptions(), SCRIPT)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"level": "max"}, "Unknown level 'max'; choose one of light, full."),
        ({"every": 0}, "every must be an integer >= 1"),
        ({"grad_histograms": -1}, "grad_histograms must be an integer >= 0"),
        ({"update_ratio": "yes"}, "update_ratio must be True or False"),
        ({"trace_steps": "3-1"}, "Bad trace steps '3-1'"),
        ({"tensorboard": 1}, "tensorboard must be True, False or a logdir path"),
    ],
)
def test_the_api_refuses_what_the_command_line_refuses(
    tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(gradtrace.GradtraceError, match=message):
        gradtrace.trace(out=tmp_path / "run", **values)
    with pytest.raises(gradtrace.GradtraceError, match=message):
        Session(tmp_path / "run", **values)
    assert not (tmp_path / "run").exists()


def test_an_options_object_and_keywords_replacing_its_fields(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    light = RunOptions(level="light", update_ratio=True)
    with gradtrace.trace(model, out=tmp_path / "run", options=light, every=2):
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()
    run_record = gradtrace.load_run(tmp_path / "run")
    assert (run_record.meta["level"], run_record.meta["every"]) == ("light", 2)
    assert run_record.meta["update_ratio"] is True
    assert [stats.step for stats in run_record.grad_steps] == [0, 2]
    assert light == RunOptions(level="light", update_ratio=True)  # frozen: left as it was
