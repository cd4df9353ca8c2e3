"""The overhead benchmark's hook timing: it must keep finding the hooks it times."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_overhead.py"


def hook_rows(level: str) -> dict[str, tuple[float, float]]:
    """{hook: (ms per step, calls per step)} from a short `--hook-time` run on the MLP."""
    # The Python core: its pack, unpack and write log are Python hooks to count.
    options = ["--hook-time", "--profile-level", level, "--profile-model", "mlp"]
    options += ["--profile-core", "python"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", *options, "--profile-steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 4 and cells[2].replace(".", "").isdigit():
            rows[cells[0]] = (float(cells[1].replace("–", "nan")), float(cells[2]))
    return rows


@pytest.mark.parametrize("level", ["light", "full"])
def test_hook_time_counts_every_kind_of_hook_a_step_calls(level: str) -> None:
    rows = hook_rows(level)
    # The MLP: the model, its Sequential, 4 linear layers and 3 ReLUs; one AdamW step.
    assert rows["ModuleStackProbe._enter"][1] == 9.0
    assert rows["GradStatsProbe._after_forward"][1] == 9.0
    assert rows["SavedTensorProbe._pack"][1] == rows["SavedTensorProbe._unpack"][1] > 0
    assert rows["StepProbe._before"][1] == rows["StepProbe._after"][1] == 1.0
    dispatch = "_WriteLogMode.__torch_dispatch__ (counted only: runs the op)"
    assert (dispatch in rows) == (level == "full")
    assert all(ms > 0 for hook, (ms, _) in rows.items() if hook != dispatch)


def test_floors_run_each_mechanism_and_leave_torch_as_they_found_it() -> None:
    # The script stops with "torch global state changed" if a configuration leaves a hook,
    # a mode or saved-tensor hooks behind.
    options = ["--floors", "--models", "mlp", "--steps", "2", "--rounds", "1", "--warmup", "1"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", *options],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("| model |"))
    for column in ("floor: empty module hooks", "floor: + empty dispatch mode", "gradtrace full"):
        assert column in header


def test_the_full_floor_installs_every_mechanism_it_stands_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as `python scripts/bench_overhead.py`
    bench = importlib.import_module("bench.configs")
    before = bench.global_state()
    with bench.floor_mechanisms("floor-full"):
        during = bench.global_state()
    assert bench.global_state() == before
    assert during["dispatch_modes"] == before["dispatch_modes"] + 1
    assert during["saved_tensor_hooks"] and not before["saved_tensor_hooks"]
    # The gradient norms and the mode stepping aside for the update.
    assert during["optimizer_pre_hooks"] == before["optimizer_pre_hooks"] + 2
    # Two forward hooks (the empty one and the output sums) and the empty pre-hook.
    grown = {
        name: during["module_hooks"][name] - count
        for name, count in before["module_hooks"].items()
        if during["module_hooks"][name] != count
    }
    assert grown == {"_global_forward_hooks": 2, "_global_forward_pre_hooks": 1}
