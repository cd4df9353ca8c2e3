"""A store that cannot write (disk full) stops recording and never fails the user's training."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest
import torch
from cli_process import gradtrace
from events_factory import evidence, write

from gradtrace.analysis.culprits import diagnose
from gradtrace.session import Session
from gradtrace.store import RunWriter, load_run
from gradtrace.store.format import DATABASE
from gradtrace.store.writer import RESERVE

STOPPED = "Recording stopped"

TRAIN = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(8)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for i in range(int(sys.argv[1])):
        loss = model(torch.randn(4, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    print("done", float(sum(p.sum() for p in model.parameters())))
    sys.exit(int(sys.argv[2]))
    """
)


def _cap_pages(db: sqlite3.Connection, extra: int) -> None:
    """Let the database grow by `extra` pages more, then fail as a full disk does."""
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    db.execute(f"PRAGMA max_page_count = {pages + extra}")


def test_a_full_store_stops_recording_once_and_keeps_what_was_committed(tmp_path: Path) -> None:
    stops: list[str] = []
    writer = RunWriter(tmp_path / "run", on_stop=stops.append)
    assert (tmp_path / "run" / RESERVE).stat().st_size > 0
    writer.write_step(0, Counter({("encoder", "relu_", "forward"): 1}).items(), finished=True)
    _cap_pages(writer._db, 0)
    counts = Counter({(f"encoder.layers.{i}", "relu_", "forward"): i for i in range(2000)})
    writer.write_step(1, counts.items(), finished=True)  # needs new pages: the store is full
    assert len(stops) == 1 and "database or disk is full" in stops[0]
    assert "steps up to 0" in stops[0]
    assert not (tmp_path / "run" / RESERVE).exists()  # freed for the last word
    finding = diagnose(evidence((write(),)))
    assert finding is not None
    assert writer.add_finding(finding) is False  # dropped, not raised
    writer.write_step(2, counts.items(), finished=True)
    writer.set_meta(status="ok", exit_code=0)
    writer.close()
    assert len(stops) == 1
    run = load_run(tmp_path / "run")
    assert run.steps == 1 and run.writes == 1 and run.findings == []
    assert run.status == "ok"
    assert run.meta["recording_stopped"] == stops[0]
    assert run.meta["notices"] == [stops[0]]


def _train(steps: int, session: Session | None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(8)])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    if session is not None:
        session.start()
        _cap_pages(session._writer._db, 6)  # the store thread has not written yet
    try:
        for _ in range(steps):
            loss = model(torch.randn(4, 16)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        if session is not None:
            session.close()
    return [p.detach().clone() for p in model.parameters()]


def test_a_session_whose_store_fills_up_trains_on_unchanged(tmp_path: Path, capsys) -> None:
    steps = 300
    untraced = _train(steps, None)
    traced = _train(steps, Session(tmp_path / "run"))
    assert all(torch.equal(a, b) for a, b in zip(untraced, traced, strict=True))
    stderr = capsys.readouterr().err
    assert stderr.count(STOPPED) == 1, stderr
    run = load_run(tmp_path / "run")
    assert 0 < run.steps < steps
    assert run.status == "ok"
    assert any(STOPPED in notice for notice in run.meta["notices"])
    assert f"steps up to {run.steps - 1}" in run.meta["recording_stopped"]


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 2 MB tmpfs (as root); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
            capture_output=True,
            timeout=60,
        )
    except OSError as error:
        pytest.skip(f"cannot mount a tmpfs here: {error}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace')}")
    try:
        yield mount
    finally:
        unmounted = subprocess.run(["umount", str(mount)], capture_output=True, timeout=60)
        if unmounted.returncode != 0:  # still busy: detach it now, the kernel frees it later
            subprocess.run(["umount", "--lazy", str(mount)], capture_output=True, timeout=60)


def test_a_full_disk_never_kills_training_nor_changes_its_exit_code(
    tmp_path: Path, small_tmpfs: Path
) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    steps = 1500
    plain = subprocess.run(
        [sys.executable, str(script), str(steps), "3"], capture_output=True, text=True, timeout=300
    )
    assert plain.returncode == 3, plain.stderr
    done = gradtrace(
        "run", "--out", str(small_tmpfs / "run"), str(script), str(steps), "3", cwd=tmp_path
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.splitlines()[0] == plain.stdout.strip()  # same training, same result
    assert "Traceback" not in done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith(f"gradtrace: {STOPPED}")]
    assert len(said) == 1, done.stderr  # once, besides the summary's note
    run = load_run(small_tmpfs / "run")
    assert run.status == "failed" and run.meta["exit_code"] == 3
    assert 0 < run.steps < steps
    assert STOPPED in run.meta["recording_stopped"]
    assert not (small_tmpfs / "run" / RESERVE).exists()
    with closing(sqlite3.connect(small_tmpfs / "run" / DATABASE)) as db:
        (notices,) = db.execute("SELECT value FROM meta WHERE key = 'notices'").fetchone()
    assert STOPPED in json.loads(notices)[0]
    shown = gradtrace("report", str(small_tmpfs / "run"), cwd=tmp_path)
    assert STOPPED in " ".join(shown.stdout.split()), shown.stderr


def test_a_disk_full_before_the_run_starts_is_one_line_and_exit_2(
    tmp_path: Path, small_tmpfs: Path
) -> None:
    script = tmp_path / "train.py"
    script.write_text("print('ran')")
    with (small_tmpfs / "filler").open("wb", buffering=0) as filler, pytest.raises(OSError):
        while True:  # fill the disk
            filler.write(b"\0" * 65536)
    done = gradtrace("run", "--out", str(small_tmpfs / "run"), str(script), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"gradtrace: error: Cannot create the run store in '{small_tmpfs / 'run'}': "
        "database or disk is full."
    ]
    assert "ran" not in done.stdout
