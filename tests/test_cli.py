"""The real CLI in a subprocess, compared with plain `python` on the same script."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_process import gradtrace, kill_when_ready
from tracebacks import frame_files, gradtrace_frames

PROBE_SCRIPT = """
import json, os, sys
print(json.dumps({"name": __name__, "argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd()}))
"""


def python(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def test_script_sees_what_python_gives_it(tmp_path: Path) -> None:
    write(tmp_path / "sub" / "show.py", PROBE_SCRIPT)
    args = ["sub/show.py", "--epochs", "3", "-m", "x", "--help"]
    plain = python(*args, cwd=tmp_path)
    traced = gradtrace("run", "--out", str(tmp_path / "run"), *args, cwd=tmp_path)
    assert traced.returncode == plain.returncode == 0, traced.stderr
    assert traced.stdout == plain.stdout
    seen = json.loads(traced.stdout)
    assert seen["name"] == "__main__"
    assert seen["argv"] == args
    assert seen["path0"] == str(tmp_path / "sub")


def test_module_form_runs_like_python_dash_m(tmp_path: Path) -> None:
    write(tmp_path / "pkg" / "__init__.py", "")
    write(tmp_path / "pkg" / "train.py", PROBE_SCRIPT)
    plain = python("-m", "pkg.train", "--lr", "1e-3", cwd=tmp_path)
    traced = gradtrace("run", "--out", "r", "-m", "pkg.train", "--lr", "1e-3", cwd=tmp_path)
    assert traced.returncode == plain.returncode == 0, traced.stderr
    assert json.loads(traced.stdout) == json.loads(plain.stdout)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("pass", 0),
        ("import sys; sys.exit(3)", 3),
        ("import sys; sys.exit('bad config')", 1),
        ("raise ValueError('boom')", 1),
    ],
)
def test_exit_code_is_the_scripts_own(tmp_path: Path, body: str, code: int) -> None:
    write(tmp_path / "s.py", body)
    plain = python("s.py", cwd=tmp_path)
    traced = gradtrace("run", "--out", "r", "s.py", cwd=tmp_path)
    assert plain.returncode == traced.returncode == code
    if "ValueError" in body:
        assert "ValueError: boom" in traced.stderr
        # As python shows it: the script's frame first, none of the runner's before it.
        assert frame_files(traced.stderr) == [str(tmp_path / "s.py")], traced.stderr
        assert 'File "' + str(tmp_path / "s.py") + '", line 1, in <module>' in traced.stderr
    assert "run directory:" in traced.stderr
    status = json.loads(gradtrace("report", "r", "--json", cwd=tmp_path).stdout)["run"]
    assert status["exit_code"] == code
    assert status["status"] == ("ok" if code == 0 else "failed")


def test_a_traceback_through_gradtrace_keeps_its_frames(tmp_path: Path) -> None:
    """The closure runs inside gradtrace's wrapper: its frame is shown, as python would."""
    write(
        tmp_path / "s.py",
        """
        import torch
        w = torch.nn.Parameter(torch.ones(2))
        optimizer = torch.optim.SGD([w], lr=0.1)
        def closure():
            raise ValueError("boom in closure")
        optimizer.step(closure)
        """,
    )
    plain = python("s.py", cwd=tmp_path)
    traced = gradtrace("run", "--out", "r", "s.py", cwd=tmp_path)
    assert plain.returncode == traced.returncode == 1
    assert "ValueError: boom in closure" in traced.stderr
    shown = frame_files(traced.stderr)
    assert [file for file in shown if file not in gradtrace_frames(traced.stderr)] == (
        frame_files(plain.stderr)
    )
    assert [Path(file).name for file in gradtrace_frames(traced.stderr)] == ["steps.py"]


def test_ctrl_c_exits_130_and_records_interrupted(tmp_path: Path) -> None:
    write(
        tmp_path / "slow.py",
        """
        import time
        print("ready", flush=True)
        time.sleep(3600)
        """,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "gradtrace", "run", "--out", "r", "slow.py"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As a terminal's Ctrl-C finds it: a suite started in the background by a
        # non-interactive shell (`pytest &`) inherits SIGINT ignored, and so would the child.
        preexec_fn=functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGINT)
    # Closing the run takes a few seconds, many more on a busy box; a lost Ctrl-C would
    # sleep for an hour.
    try:
        _, stderr = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "KeyboardInterrupt" in stderr
    report = json.loads(gradtrace("report", "r", "--json", cwd=tmp_path).stdout)
    assert report["run"]["status"] == "interrupted"


def test_killed_run_keeps_every_finished_step(tmp_path: Path) -> None:
    write(
        tmp_path / "train.py",
        """
        import time, torch
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):
            opt.zero_grad()
            x = torch.randn(2, 4)
            x.mul_(2)
            model(x).sum().backward()
            opt.step()
        print("ready", flush=True)
        time.sleep(60)
        """,
    )
    kill_when_ready(["run", "--out", "r", "train.py"], tmp_path)
    report = json.loads(gradtrace("report", "r", "--json", cwd=tmp_path).stdout)
    assert report["run"]["status"] == "killed"
    assert report["run"]["steps"] == 3
    loop_writes = [
        w for w in report["writes"] if (w["owner"], w["op"]) == ("training loop", "mul_")
    ]
    assert sum(w["count"] for w in loop_writes) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.py"], "No such script: 'missing.py'."),
        (["run"], "Give a script to run"),
        (["report", "nowhere"], "No gradtrace run at 'nowhere'"),
        (["run", "--level", "max", "s.py"], "Invalid value for '--level'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    write(tmp_path / "s.py", "pass")
    result = gradtrace(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def _without_read_override() -> list[str]:
    """A command prefix under which a mode-000 file is unreadable: root reads it anyway unless
    its capabilities to bypass file permissions are dropped."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root reads a mode-000 file and setpriv is missing to drop that")
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", "--bounding-set", drop, "--inh-caps", drop, "--"]


def test_an_unreadable_script_is_refused_like_python_does(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    write(script, "print('ran')")
    script.chmod(0)
    prefix = _without_read_override()
    plain = subprocess.run(
        [*prefix, sys.executable, "s.py"], cwd=tmp_path, capture_output=True, text=True
    )
    assert plain.returncode == 2, plain.stderr  # python: can't open file
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "gradtrace", "run", "--out", "r", "s.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gradtrace: error: Cannot open script 's.py': Permission denied."
    ]
    assert not (tmp_path / "r").exists()


def test_existing_run_directory_is_never_overwritten(tmp_path: Path) -> None:
    write(tmp_path / "s.py", "pass")
    assert gradtrace("run", "--out", "r", "s.py", cwd=tmp_path).returncode == 0
    again = gradtrace("run", "--out", "r", "s.py", cwd=tmp_path)
    assert again.returncode == 2
    assert "already exists" in again.stderr
    assert "Traceback" not in again.stderr


def test_default_run_directory_is_under_gradtrace_runs(tmp_path: Path) -> None:
    write(tmp_path / "s.py", "pass")
    for _ in range(2):
        assert gradtrace("run", "s.py", cwd=tmp_path).returncode == 0
    runs = sorted(p.name for p in (tmp_path / "gradtrace-runs").iterdir())
    assert len(runs) == 2
    assert all("-s" in name for name in runs)


def test_report_renders_the_finding_post_mortem(tmp_path: Path) -> None:
    example = Path(__file__).parents[1] / "examples" / "inplace_bug.py"
    run = gradtrace("run", "--out", "r", str(example), cwd=tmp_path)
    assert run.returncode == 1
    report = gradtrace("report", "r", cwd=tmp_path, env={**os.environ, "COLUMNS": "120"})
    assert report.returncode == 0
    assert "in-place write broke backward" in report.stdout
    assert f"{example}:25" in report.stdout
    assert "encoder.1.act" in report.stdout


CLIPPED_TRAINING = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
for step in range(5):
    loss = model(torch.randn(16, 4)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
    print(step, norm.item())
    optimizer.step()
"""


def test_update_ratio_and_clipping_from_the_command_line(tmp_path: Path) -> None:
    write(tmp_path / "train.py", CLIPPED_TRAINING)
    plain = python("train.py", cwd=tmp_path)
    traced = gradtrace(
        "run", "--update-ratio", "--every", "2", "--out", "r", "train.py", cwd=tmp_path
    )
    assert traced.returncode == plain.returncode == 0, traced.stderr
    assert traced.stdout == plain.stdout
    assert "‖Δp‖/‖p‖" in traced.stderr and "(global, before clip)" in traced.stderr
    returned = dict(line.split() for line in plain.stdout.splitlines())
    report = gradtrace("report", "r", "--json", cwd=tmp_path)
    stats = json.loads(report.stdout)["grad_stats"]
    assert stats["global_grad_norm_before_clip"] == [
        [step, pytest.approx(float(returned[str(step)]), rel=1e-6)] for step in (0, 2, 4)
    ]
    assert [step for step, _ in stats["modules"]["0"]["update_ratio"]] == [0, 2, 4]
    assert all(0 < ratio < 1 for _, ratio in stats["params"]["2.weight"]["update_ratio"])
