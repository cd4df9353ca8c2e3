"""The native core: chosen where it builds, a one-line fallback where not, PyTorch's words."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from cores import CORES, needs_native
from torch import nn

from gradtrace import _native
from gradtrace.session import Session
from gradtrace.store.reader import load_run


def gradtrace(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradtrace", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


@needs_native
def test_info_names_the_native_core_and_the_python_one_when_asked(tmp_path: Path) -> None:
    native = gradtrace("info", cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    assert native.stdout.startswith("core: native (loaded from ")
    assert f"torch: {torch.__version__}" in native.stdout
    python = gradtrace("info", cwd=tmp_path, env={_native.CORE_ENV: "python"})
    assert python.stdout.startswith("core: python (GRADTRACE_CORE=python)")


def test_a_core_that_cannot_be_built_falls_back_in_one_line(tmp_path: Path) -> None:
    """No compiler: the run trains and reports on the Python probes, and says so once."""
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            model = torch.nn.Linear(3, 1)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(2):
                model(torch.randn(2, 3)).sum().backward()
                opt.step()
            print("trained")
            """
        )
    )
    env = {
        _native.CACHE_ENV: str(tmp_path / "empty cache"),
        "CXX": "/bin/false",
        _native.CORE_ENV: "",  # the default choice, whatever this test run was given
    }
    traced = gradtrace("run", "--out", "r", "train.py", cwd=tmp_path, env=env)
    assert traced.returncode == 0, traced.stderr
    assert traced.stdout == "trained\n"
    [line] = [text for text in traced.stderr.splitlines() if "native core unavailable" in text]
    assert line.endswith("tracing on the Python probes.")
    assert "Traceback" not in traced.stderr
    report = gradtrace("report", "r", "--json", cwd=tmp_path, env=env)
    assert json.loads(report.stdout)["run"]["core"] == "python"


def _plain_and_traced_error(program, tmp_path: Path, core: str) -> tuple[str, str]:
    with pytest.raises(RuntimeError) as plain:
        program()
    with pytest.raises(RuntimeError) as traced, Session(tmp_path / "run", core=core):
        program()
    return str(plain.value), str(traced.value)


def _index_put_on_a_saved_input() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    x = w * 2  # MulBackward0
    y = x * w  # saves x as an input of mul
    x[torch.tensor([0, 2])] = 0.0  # index_put_: x's grad_fn is now IndexPutBackward0
    y.sum().backward()


def _relu_on_a_saved_output() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.sigmoid(x)  # saves its own output
    y.relu_()
    y.sum().backward()


def _second_output_written_through_detach() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(4, requires_grad=True)
    _, mean = torch.std_mean(x * 1, dim=1)  # mean is output 1 of StdMeanBackward0
    y = mean * w  # saves mean as an input: PyTorch says "output 0" for it
    mean.detach().add_(1)  # shares the version counter, keeps the grad_fn
    y.sum().backward()


def _slice_of_a_buffer_that_dies() -> None:
    layer = nn.Linear(5, 5)
    h = torch.zeros(3, 2, 5)
    h[0] = torch.randn(2, 5)
    for i in range(2):
        h[i + 1] = layer(h[i])  # the slice h[i] dies here; PyTorch names AsStrided
    h.sum().backward()


def _input_written_through_a_view() -> None:
    w = torch.randn(4, requires_grad=True)
    x = w * 2
    y = x * w
    x.view(2, 2)[0].zero_()  # x's grad_fn becomes CopySlices
    y.sum().backward()


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize(
    "program",
    [
        _index_put_on_a_saved_input,
        _relu_on_a_saved_output,
        _second_output_written_through_detach,
        _slice_of_a_buffer_that_dies,
        _input_written_through_a_view,
    ],
)
def test_the_error_is_pytorchs_own_text_then_the_attribution(
    program, tmp_path: Path, core: str
) -> None:
    plain, traced = _plain_and_traced_error(program, tmp_path, core)
    pytorch_part, _, attribution = traced.partition("\n\ngradtrace: ")
    assert pytorch_part == plain
    assert attribution
    [stored] = load_run(tmp_path / "run").findings
    assert stored.finding.code and stored.finding.line


@needs_native
def test_writes_through_aliases_optimizers_and_modes_are_all_counted(tmp_path: Path) -> None:
    """What the Python write log sees, the observer sees: `.data`, `detach()`, `out=`,
    `_foreach_*_`, fused optimizers, no_grad and inference_mode."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    fused = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    foreach = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
    with Session(tmp_path / "run", core="native", trace_steps="none"):
        x = torch.randn(2, 4)
        x.data.mul_(2)
        x.detach().add_(1)
        torch.add(x, 1, out=torch.empty(2, 4))
        with torch.no_grad():
            x.clamp_(0, 1)
        with torch.inference_mode():
            torch.ones(3).sub_(1)
        # Graphs kept alive: a plain step with nothing live to corrupt is not observed.
        kept = model(x).sum()
        kept.backward(retain_graph=True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        fused.step()
        foreach.step()
        del kept
    counts = {(owner, op): n for owner, op, _, n in load_run(tmp_path / "run").write_counts}
    for key in [
        ("training loop", "mul_"),
        ("training loop", "add_"),
        ("training loop", "add"),
        ("training loop", "clamp_"),
        ("training loop", "sub_"),
        ("training loop", "_foreach_mul_"),
        ("AdamW.step", "_fused_adamw_"),
        ("SGD.step", "_foreach_add_"),
    ]:
        assert counts.get(key), (key, counts)


def _count_writes(tmp_path: Path, core: str) -> list[tuple[str, str, str, int]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Dropout(0.1), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    with Session(tmp_path / core, core=core, trace_steps="none"):
        for _ in range(3):
            x = torch.randn(5, 6)
            x[:, 0] = 0.0
            x[x > 2] = 2.0
            loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1, 1]))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    return sorted(load_run(tmp_path / core).write_counts)


@needs_native
def test_both_cores_count_the_same_writes(tmp_path: Path) -> None:
    """The writes a program issues, no more: not those torch's kernels make inside an op."""
    native = _count_writes(tmp_path, _native.NATIVE)
    assert native == _count_writes(tmp_path, _native.PYTHON)
    assert {(owner, op) for owner, op, _, _ in native} >= {
        ("1", "relu_"),
        ("training loop", "fill_"),
        ("training loop", "index_put_"),
        ("training loop", "_foreach_mul_"),
    }


@pytest.mark.parametrize("core", CORES)
def test_a_session_left_running_at_exit_ends_the_process_cleanly(tmp_path: Path, core: str) -> None:
    """`gradtrace.start()` without `.stop()`: the interpreter shuts down with the probes on
    and a saved tensor still registered; the process must end as python's would."""
    script = tmp_path / "left_running.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            import gradtrace

            gradtrace.start(out="run")
            x = torch.randn(3, requires_grad=True)
            kept = torch.sigmoid(x)  # saved for backward, never freed before exit
            kept.mul(2).sum().backward(retain_graph=True)
            print("done")
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, _native.CORE_ENV: core},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (result.returncode, result.stdout) == (0, "done\n"), result.stderr
