"""TensorBoard output, read back with tensorboard's own reader (and its own server)."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from cli_process import gradtrace, kill_when_ready
from events_factory import evidence, write

from gradtrace.analysis.culprits import diagnose
from gradtrace.analysis.report import build_report
from gradtrace.api import start, trace
from gradtrace.errors import GradtraceError
from gradtrace.events import ParamStat, StepGradStats
from gradtrace.reporters.tensorboard import (
    finding_markdown,
    module_tag,
    tensorboard_dir,
    write_tensorboard,
)
from gradtrace.store.reader import Run, StoredFinding, load_run

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)
from tensorboard.util import tensor_util

BUG_SCRIPT = Path(__file__).parent / "corpus" / "bugs" / "data_scale_silent.py"

TRAIN = """
import sys, time, torch
from torch import nn
from gradtrace import session

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(int(sys.argv[1])):
    opt.zero_grad()
    loss = model(torch.randn(16, 4)).pow(2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    session.active().log(loss=loss)
print("ready", flush=True)
if len(sys.argv) > 2:
    time.sleep(60)
"""


def accumulate(logdir: Path) -> EventAccumulator:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def stat(name: str, module: str, grad: float, param: float) -> ParamStat:
    return ParamStat(name, module, 4, grad, param, 0.0, 0)


def sample_run(tmp_path: Path) -> Run:
    finding = diagnose(evidence((write("relu_"), write("add_", seq=1))))
    assert finding is not None
    steps = [
        StepGradStats(
            step=step,
            optimizer="AdamW.step",
            params=(
                stat("encoder.layers.3.attn.weight", "encoder.layers.3.attn", 3.0 * (step + 1), 4),
                stat("encoder.layers.3.attn.bias", "encoder.layers.3.attn", 4.0 * (step + 1), 3),
                stat("head.weight", "head", 0.5, 1.0),
            ),
            missing=(),
            nonfinite_outputs=(),
            cut=(),
            new_sites=(),
        )
        for step in range(3)
    ]
    return Run(
        path=tmp_path / "run",
        meta={"status": "ok", "exit_code": 0, "argv": ["train.py"], "level": "full"},
        findings=[StoredFinding(finding, 2)],
        steps=3,
        grad_steps=steps,
        scalars={"loss": [(0, 1.5), (1, 1.0), (2, 0.5)], "amp/scale": [(1, 65536.0)]},
        step_write_counts=[
            (0, "encoder.act", "relu_", "forward", 2),
            (0, "encoder.act", "add_", "forward", 1),
            (1, "AdamW.step", "lerp_", "optimizer", 6),
            (2, "AdamW.step", "lerp_", "optimizer", 6),
        ],
        step_end_ns={0: 1_000_000_000, 1: 2_000_000_000, 2: 3_000_000_000},
    )


def test_update_ratio_clipping_and_dead_unit_scalars(tmp_path: Path) -> None:
    from dataclasses import replace

    from gradtrace.events import ClipCall

    run = sample_run(tmp_path)
    moved = [
        replace(
            stats,
            params=tuple(replace(p, update_norm=0.01 * p.param_norm) for p in stats.params),
            clips=(ClipCall(20.0, 1.0, 2.0),),
            dead_units=(("encoder.act", 3, 4),),
        )
        for stats in run.grad_steps
    ]
    events = accumulate(
        write_tensorboard(build_report(replace(run, grad_steps=moved)), tmp_path / "tb")
    )
    ratios = scalars(events, "update_ratio/encoder/layers.3/attn")
    assert [step for step, _ in ratios] == [0, 1, 2]
    assert [value for _, value in ratios] == pytest.approx([0.01] * 3)
    assert scalars(events, "global/grad_norm_before_clip") == [(0, 20.0), (1, 20.0), (2, 20.0)]
    assert scalars(events, "global/clip_max_norm") == [(0, 1.0), (1, 1.0), (2, 1.0)]
    assert scalars(events, "dead_units/encoder/act") == [(0, 0.75), (1, 0.75), (2, 0.75)]


def test_module_paths_become_tag_trees() -> None:
    assert module_tag("encoder.layers.3.attn") == "encoder/layers.3/attn"
    assert module_tag("encoder.1.act") == "encoder.1/act"
    assert module_tag("0") == "0"
    assert module_tag("AdamW.step") == "AdamW/step"
    assert module_tag("") == "(root)"


def test_stored_run_becomes_scalars_histograms_and_text(tmp_path: Path) -> None:
    run = sample_run(tmp_path)
    logdir = write_tensorboard(build_report(run), tmp_path / "tb")
    events = accumulate(logdir)
    tags = events.Tags()
    assert scalars(events, "grad_norm/encoder/layers.3/attn") == [(0, 5.0), (1, 10.0), (2, 15.0)]
    assert scalars(events, "grad_to_param/encoder/layers.3/attn") == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert scalars(events, "grad_norm/head") == [(0, 0.5), (1, 0.5), (2, 0.5)]
    global_norm = scalars(events, "global/grad_norm")
    assert [step for step, _ in global_norm] == [0, 1, 2]
    assert global_norm[1][1] == pytest.approx(math.sqrt(10.0**2 + 0.5**2))
    assert scalars(events, "loss") == [(0, 1.5), (1, 1.0), (2, 0.5)]
    assert scalars(events, "amp/scale") == [(1, 65536.0)]
    assert scalars(events, "inplace_writes/encoder/act") == [(0, 3.0)]
    assert scalars(events, "inplace_writes/AdamW/step") == [(1, 6.0), (2, 6.0)]
    assert scalars(events, "global/inplace_writes") == [(0, 3.0), (1, 6.0), (2, 6.0)]
    # The in-place finding (step 0) counts from step 0.
    assert scalars(events, "global/findings") == [(0, 1.0), (1, 1.0), (2, 1.0)]
    assert [e.wall_time for e in events.Scalars("loss")] == [1.0, 2.0, 3.0]
    [histogram] = events.Tensors("param_grad_norm/all")[:1]
    buckets = tensor_util.make_ndarray(histogram.tensor_proto)
    assert buckets[:, 2].sum() == 3  # one value per parameter
    assert len(events.Tensors("param_grad_norm/log10")) == 3
    [text_tag] = [tag for tag in tags["tensors"] if tag.startswith("findings/")]
    assert text_tag == "findings/01-inplace-write"
    [text] = events.Tensors(text_tag)
    markdown = tensor_util.make_ndarray(text.tensor_proto).item().decode()
    assert markdown.startswith("### in-place write broke backward (seen 2×)")
    assert "module `encoder.act` · op `relu_` · forward of step 0" in markdown
    assert "at `/work/model.py:42` in `Block.forward`" in markdown
    assert "> 42 |     g.relu_()" in markdown
    assert "**fix:** Use the out-of-place op" in markdown


def test_regenerating_replaces_only_gradtraces_own_event_files(tmp_path: Path) -> None:
    run = sample_run(tmp_path)
    logdir = tmp_path / "tb"
    logdir.mkdir()
    (logdir / "notes.txt").write_text("mine")
    write_tensorboard(build_report(run), logdir)
    write_tensorboard(build_report(run), logdir)
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
    assert (logdir / "notes.txt").read_text() == "mine"
    assert scalars(accumulate(logdir), "loss") == [(0, 1.5), (1, 1.0), (2, 0.5)]


def test_finding_markdown_for_a_gradient_finding() -> None:
    from gradtrace.events import Finding

    finding = Finding(
        kind="exploding",
        message="encoder.2 gradient norm jumped 40× its median at step 12.",
        hint="Clip gradients (torch.nn.utils.clip_grad_norm_) or lower the learning rate.",
        step=12,
        phase=None,
        op=None,
        module="encoder.2",
        file="/work/model.py",
        line=7,
        function="Net.forward",
        code="h = self.encoder(x)",
        saved_by={},
        parameter="encoder.2.weight",
    )
    markdown = finding_markdown(StoredFinding(finding, 1))
    assert markdown.startswith("### exploding gradients\n")
    assert "- module `encoder.2` · parameter `encoder.2.weight` · step 12" in markdown
    assert "> 7 | h = self.encoder(x)" in markdown
    assert "clip\\_grad\\_norm\\_" in markdown  # markdown would read _..._ as emphasis


def test_live_events_equal_regenerated_ones(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(TRAIN))
    with trace(out=tmp_path / "run", tensorboard=True, update_ratio=True):
        subprocess_free_run(script, "4")
    live_dir = tmp_path / "run" / "tensorboard"
    live = accumulate(live_dir)
    assert [step for step, _ in scalars(live, "loss")] == [0, 1, 2, 3]
    for tag in ("update_ratio/0", "global/grad_norm_before_clip", "global/clip_max_norm"):
        assert [step for step, _ in scalars(live, tag)] == [0, 1, 2, 3], tag
    assert [step for step, _ in scalars(live, "grad_norm/0")] == [0, 1, 2, 3]
    assert [step for step, _ in scalars(live, "global/grad_norm")] == [0, 1, 2, 3]
    # clip_grad_norm_ scales the gradients in place: one _foreach_mul_ per step.
    assert scalars(live, "inplace_writes/training loop")[-1] == (3, 1.0)
    regenerated = accumulate(
        write_tensorboard(build_report(load_run(tmp_path / "run")), tmp_path / "regen")
    )
    for kind in ("scalars", "tensors"):
        assert sorted(live.Tags()[kind]) == sorted(regenerated.Tags()[kind])
    for tag in live.Tags()["scalars"]:
        assert scalars(live, tag) == scalars(regenerated, tag), tag


def subprocess_free_run(script: Path, *argv: str) -> None:
    """Run a training script in this process (the session's hooks are global)."""
    import runpy

    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved


def test_tensorboard_missing_fails_before_the_run_directory_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.event_file_writer", None)
    with pytest.raises(GradtraceError, match=r"pip install 'gradtrace\[tensorboard\]'"):
        start(out=tmp_path / "run", tensorboard=True)
    assert not (tmp_path / "run").exists()


def test_cli_writes_live_into_a_users_logdir_with_the_finding(tmp_path: Path) -> None:
    result = gradtrace(
        "run", "--out", "r", "--tensorboard-logdir", "logs", str(BUG_SCRIPT), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    logdir = tensorboard_dir(tmp_path / "r", tmp_path / "logs")
    assert logdir == tmp_path / "logs" / "gradtrace" / "r"
    events = accumulate(logdir)
    assert [step for step, _ in scalars(events, "global/grad_norm")] == [0, 1, 2]
    assert scalars(events, "global/findings")[-1][1] >= 1
    texts = [tag for tag in events.Tags()["tensors"] if tag.startswith("findings/")]
    assert texts[0] == "findings/01-silent-overwrite"
    markdown = tensor_util.make_ndarray(events.Tensors(texts[0])[0].tensor_proto).item().decode()
    assert "module `heads.0.scorer` · op `mul_`" in markdown
    assert "energy.data.mul_(0.5)" in markdown
    assert not (tmp_path / "r" / "tensorboard").exists()


def test_cli_regenerates_a_killed_run_from_its_finished_steps(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(textwrap.dedent(TRAIN))
    kill_when_ready(["run", "--out", "r", "train.py", "3", "sleep"], tmp_path)
    result = gradtrace("tensorboard", "r", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"TensorBoard events in {Path('r') / 'tensorboard'}" in result.stdout
    events = accumulate(tmp_path / "r" / "tensorboard")
    # Every finished step; gradients and the loss as far as the store got them (they are
    # read one step late), and at least the first step's.
    assert [step for step, _ in scalars(events, "global/inplace_writes")] == [0, 1, 2]
    stored = load_run(tmp_path / "r")
    assert scalars(events, "loss") == stored.scalars["loss"]
    assert scalars(events, "loss")[0][0] == 0
    grad_steps = [stats.step for stats in stored.grad_steps]
    assert [step for step, _ in scalars(events, "global/grad_norm")] == grad_steps
    assert grad_steps[0] == 0


def test_cli_tensorboard_on_a_missing_run_is_one_line(tmp_path: Path) -> None:
    result = gradtrace("tensorboard", "nowhere", cwd=tmp_path)
    assert result.returncode == 2
    assert "No gradtrace run at 'nowhere'" in result.stderr
    assert "Traceback" not in result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_real_tensorboard_server_serves_the_scalars(tmp_path: Path) -> None:
    run = sample_run(tmp_path)
    write_tensorboard(build_report(run), tensorboard_dir(run.path, tmp_path / "logs"))
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(tmp_path / "logs"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast=false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/data/plugin/scalars"
    try:
        tags: dict[str, dict[str, object]] = {}
        deadline = time.monotonic() + 20
        while "gradtrace/run" not in tags and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/tags", timeout=2) as response:
                    tags = json.load(response)
            except OSError:
                time.sleep(0.2)
        assert "gradtrace/run" in tags, "tensorboard did not serve the run within 20 s"
        assert "grad_norm/encoder/layers.3/attn" in tags["gradtrace/run"]
        query = "run=gradtrace/run&tag=global/findings"
        with urllib.request.urlopen(f"{base}/scalars?{query}", timeout=5) as response:
            points = json.load(response)
        assert [(step, value) for _, step, value in points] == [(0, 1.0), (1, 1.0), (2, 1.0)]
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
