"""Runs someone sends you: hostile strings, links, huge or broken contents, odd media.

Each case starts from a real run of `examples/inplace_bug.py` (recorded once), edits a copy
of its database the way an attacker or a damaged disk would, and opens it with the real
CLI. The promise tested: opening a run directory is safe, and bad input gets one line on
stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chromium import chromium_command, needs_chromium
from cli_process import gradtrace as run_cli

from gradtrace.cli import main
from gradtrace.store.format import DATABASE
from gradtrace.store.reader import MAX_TEXT

ROOT = Path(__file__).resolve().parents[1]
XSS = "<img src=x onerror=\"document.body.setAttribute('data-pwned','yes')\">"
LINK = "[link=https://evil.example/]x[/link]"
TITLE = "\x1b]0;pwned title\x07"
CLEAR = "\x1b[2J"


def gradtrace(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, with a wide terminal so that tables do not cut names."""
    return run_cli(*args, cwd=cwd, env={**os.environ, "COLUMNS": "250", **env})


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`gradtrace run --out R examples/inplace_bug.py`, once for the module."""
    run_dir = tmp_path_factory.mktemp("recorded") / "R"
    done = run_cli(
        "run", "--out", str(run_dir), str(ROOT / "examples" / "inplace_bug.py"), cwd=ROOT
    )
    assert done.returncode == 1, done.stderr  # the example's backward fails, as intended
    assert (run_dir / DATABASE).is_file()
    return run_dir


@pytest.fixture
def run_dir(recorded: Path, tmp_path: Path) -> Path:
    """A fresh copy of the recorded run, inside a directory of runs of its own."""
    copy = tmp_path / "runs" / "R"
    shutil.copytree(recorded, copy)
    return copy


def edit(run_dir: Path, *statements: str | tuple[str, tuple[Any, ...]]) -> None:
    with sqlite3.connect(run_dir / DATABASE) as db:
        for statement in statements:
            sql, params = statement if isinstance(statement, tuple) else (statement, ())
            db.execute(sql, params)
    db.close()


def loosen(run_dir: Path, table: str) -> None:
    """Recreate `table` without types or constraints, so any value (NULL, text, a blob) fits,
    as in a database some other program wrote."""
    with sqlite3.connect(run_dir / DATABASE) as db:
        columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        db.execute(f"CREATE TABLE loose ({', '.join(columns)})")
        db.execute(f"INSERT INTO loose SELECT * FROM {table}")
        db.execute(f"DROP TABLE {table}")
        db.execute(f"ALTER TABLE loose RENAME TO {table}")
    db.close()


def finding_body(run_dir: Path) -> dict[str, Any]:
    with sqlite3.connect(run_dir / DATABASE) as db:
        (body,) = db.execute("SELECT body FROM findings").fetchone()
    db.close()
    return json.loads(body)


def set_finding(run_dir: Path, body: object) -> None:
    text = body if isinstance(body, str) else json.dumps(body)
    edit(run_dir, ("UPDATE findings SET body = ?", (text,)))


def set_meta(run_dir: Path, key: str, value: str) -> None:
    edit(run_dir, ("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value)))


# ---------------------------------------------------------------------------------------
# Hostile strings


def plant_hostile_strings(run_dir: Path) -> None:
    """Script, markup and escape sequences in every kind of stored name and word."""
    body = finding_body(run_dir)
    body.update(
        phase=XSS,
        kind=f"[bold red]{LINK}",
        module=f"mod{LINK}{TITLE}",
        op=f"op{XSS}{CLEAR}",
        message=f"msg {XSS} {LINK} {TITLE}",
        hint=f"hint {XSS}",
        function=f"fn{XSS}",
    )
    body["saved_by"].update(module=f"saver{XSS}{LINK}", node=f"Node{CLEAR}")
    body["context"] = [f"code {XSS} {TITLE}", *body["context"][1:]]
    set_finding(run_dir, body)
    set_meta(run_dir, "argv", json.dumps([f"train.py{LINK}", XSS, CLEAR]))
    set_meta(
        run_dir, "exception", json.dumps({"type": f"E{XSS}", "message": f"boom {TITLE}{LINK}"})
    )
    edit(
        run_dir,
        (
            "UPDATE write_counts SET owner = ?, op = ?, phase = ?",
            (f"OWN{LINK}{TITLE}", f"op{XSS}", f"ph{CLEAR}"),
        ),
    )


def test_stored_script_is_escaped_in_html(run_dir: Path, tmp_path: Path) -> None:
    plant_hostile_strings(run_dir)
    page = tmp_path / "report.html"
    done = gradtrace("report", "--html", str(page), str(run_dir), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    html = page.read_text(encoding="utf-8")
    assert "<img" not in html
    assert 'onerror="document' not in html
    assert "&lt;img src=x onerror=" in html
    assert "&lt;img src=x onerror=&quot;document.body" in html  # phase, escaped like the rest


@needs_chromium
def test_stored_script_does_not_run_in_chromium(run_dir: Path, tmp_path: Path) -> None:
    plant_hostile_strings(run_dir)
    page = tmp_path / "report.html"
    assert gradtrace("report", "--html", str(page), str(run_dir), cwd=tmp_path).returncode == 0
    # The harness itself can see a script run: the same markup unescaped does.
    control = tmp_path / "control.html"
    control.write_text(f"<!DOCTYPE html><html><body>{XSS}</body></html>")
    assert 'data-pwned="yes"' in dump_dom(control, tmp_path)
    assert 'data-pwned="yes"' not in dump_dom(page, tmp_path)


def dump_dom(page: Path, tmp_path: Path) -> str:
    """The page's DOM after its scripts ran, from headless Chromium."""
    done = subprocess.run(
        chromium_command(page, tmp_path / "profile", "--virtual-time-budget=2000", "--dump-dom"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "<body" in done.stdout, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("colour", [False, True], ids=["piped", "forced-colour"])
def test_stored_markup_and_escapes_reach_the_terminal_as_plain_text(
    run_dir: Path, colour: bool
) -> None:
    plant_hostile_strings(run_dir)
    env = {"FORCE_COLOR": "1", "TTY_COMPATIBLE": "1"} if colour else {}
    for args in (("report", str(run_dir)), ("ls", str(run_dir.parent))):
        done = gradtrace(*args, cwd=run_dir.parent, **env)
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert "\x07" not in out and "\x1b]" not in out and "\x1b[2J" not in out
        assert "evil.example" in out  # the link markup is shown as text, not made a link
        if not colour:
            assert "\x1b" not in out
        if args[0] == "report":
            for shown in ("OWN[link=https://evil.example/]x[/link]", "[bold red][link="):
                assert shown in out
            assert "pwned title" in out  # the text stays, its escape sequence goes
        else:
            assert "train.py[link=https://evil.example/]x[/link]" in out


def test_stored_words_are_escaped_in_tensorboard_markdown(run_dir: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plant_hostile_strings(run_dir)
    done = gradtrace("tensorboard", str(run_dir), cwd=run_dir)
    assert done.returncode == 0, done.stderr
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    (tag,) = [t for t in events.Tags()["tensors"] if t.startswith("findings/")]
    markdown = events.Tensors(tag)[0].tensor_proto.string_val[0].decode()
    # Outside code (where markdown shows text as it is), every '<' is escaped.
    prose = re.sub(r"```.*?```|`[^`]*`", "", markdown, flags=re.DOTALL)
    assert re.search(r"(?<!\\)<", prose) is None, prose
    assert "\\<img src=x onerror" in prose


# ---------------------------------------------------------------------------------------
# Links inside a received run


def test_trace_does_not_write_through_a_link(run_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (run_dir / "trace.json").unlink()
    (run_dir / "trace.json").symlink_to(victim)
    done = gradtrace("trace", str(run_dir), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "is a link" in done.stderr
    assert victim.read_text() == "precious"


def test_trace_does_not_write_through_a_hard_link(run_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (run_dir / "trace.json").unlink()
    os.link(victim, run_dir / "trace.json")
    done = gradtrace("trace", str(run_dir), cwd=tmp_path)
    assert done.returncode == 2 and "is a link" in done.stderr
    assert victim.read_text() == "precious"


def test_tensorboard_does_not_write_into_a_linked_directory(run_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "events.out.tfevents.1.host.2.gradtrace").write_text("precious")
    (run_dir / "tensorboard").symlink_to(victim, target_is_directory=True)
    done = gradtrace("tensorboard", str(run_dir), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "is a link" in done.stderr
    assert [p.name for p in victim.iterdir()] == ["events.out.tfevents.1.host.2.gradtrace"]
    assert (victim / "events.out.tfevents.1.host.2.gradtrace").read_text() == "precious"


# ---------------------------------------------------------------------------------------
# Oversized content


def test_a_finding_with_200000_context_lines_is_bounded(run_dir: Path) -> None:
    body = finding_body(run_dir)
    body["context"] = [f"x = {n}" for n in range(200_000)]
    body["module"] = "m" * 5_000_000
    set_finding(run_dir, body)
    done = gradtrace("report", str(run_dir), cwd=run_dir)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) < 2_000_000
    assert "x = 999" in done.stdout and "x = 1000" not in done.stdout
    assert "more characters" in done.stdout
    html = run_dir / "r.html"
    assert gradtrace("report", "--html", str(html), str(run_dir), cwd=run_dir).returncode == 0
    assert html.stat().st_size < 1_000_000
    if _has_tensorboard():
        assert gradtrace("tensorboard", str(run_dir), cwd=run_dir).returncode == 0


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("column", ["owner", "op", "phase"])
def test_five_megabyte_names_are_refused_in_one_line(run_dir: Path, column: str) -> None:
    edit(run_dir, (f"UPDATE write_counts SET {column} = ?", ("n" * 5_000_000,)))
    for args in (("report",), ("tensorboard",), ("trace",)):
        done = gradtrace(*args, str(run_dir), cwd=run_dir)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1
        assert f"write_counts.{column}: a text longer than {MAX_TEXT}" in done.stderr


# ---------------------------------------------------------------------------------------
# Broken runs: a well-formed database with wrong types, NULLs, odd JSON


def _meta(key: str, value: str):
    return lambda run: set_meta(run, key, value)


def _body(**changes: object):
    def change(run: Path) -> None:
        body = finding_body(run)
        for key, value in changes.items():
            if value is _ABSENT:
                del body[key]
            else:
                body[key] = value
        set_finding(run, body)

    return change


def _saved_by(**changes: object):
    def change(run: Path) -> None:
        body = finding_body(run)
        body["saved_by"].update(changes)
        set_finding(run, body)

    return change


def _column(table: str, sql: str, params: tuple[Any, ...] = ()):
    def change(run: Path) -> None:
        loosen(run, table)
        edit(run, (sql, params))

    return change


_ABSENT = object()
_DEEP = "[" * 100_000 + "]" * 100_000
_NESTED = json.dumps(json.loads("[" * 40 + "]" * 40))
_PARAM_ROW = "INSERT INTO param_stats VALUES (0, 'AdamW.step', 'w', 'm', ?, ?, 1.0, 0.0, 0, NULL)"

BROKEN: dict[str, Any] = {
    "argv-a-number": _meta("argv", "5"),
    "argv-a-string": _meta("argv", '"5"'),
    "argv-holds-a-number": _meta("argv", '["train.py", 5]'),
    "status-a-list": _meta("status", '["ok"]'),
    "status-null": _meta("status", "null"),
    "exit-code-text": _meta("exit_code", '"1"'),
    "exit-code-fraction": _meta("exit_code", "1.5"),
    "started-ns-text": _meta("started_ns", '"yesterday"'),
    "exception-a-string": _meta("exception", '"boom"'),
    "exception-type-null": _meta("exception", '{"type": null, "message": "m"}'),
    "notices-an-object": _meta("notices", "{}"),
    "notices-hold-numbers": _meta("notices", "[1, 2]"),
    "checkpointed-a-list": _meta("checkpointed", "[1]"),
    "level-a-list": _meta("level", '["full"]'),
    "rank-text": _meta("rank", '"0"'),
    "update-ratio-text": _meta("update_ratio", '"yes"'),
    "meta-not-json": _meta("status", "ok"),
    "meta-deeply-nested": _meta("exception", _DEEP),
    "meta-unknown-key-nested": _meta("future_key", _NESTED),
    "meta-key-with-escapes-nested": _meta(f"key{CLEAR}{TITLE}", _NESTED),
    "meta-value-null": _column("meta", "UPDATE meta SET value = NULL WHERE key = 'status'"),
    "message-null": _body(message=None),
    "message-missing": _body(message=_ABSENT),
    "kind-null": _body(kind=None),
    "step-text": _body(step="0"),
    "step-beyond-int64": _body(step=10**30),
    "line-text": _body(line="25"),
    "rank-a-list": _body(rank=[0]),
    "saved-by-a-list": _body(saved_by=["sigmoid"]),
    "saved-by-shape-text": _saved_by(shape="64x32"),
    "saved-by-version-text": _saved_by(version_now="1"),
    "context-a-string": _body(context="return x"),
    "context-holds-numbers": _body(context=[1, 2]),
    "other-writes-hold-numbers": _body(other_writes=[5]),
    "details-deeply-nested": _body(details={"a": json.loads(_NESTED)}),
    "body-deeply-nested": lambda run: set_finding(run, _DEEP),
    "body-not-json": lambda run: set_finding(run, "{not json"),
    "body-a-list": lambda run: set_finding(run, "[]"),
    "finding-body-null": _column("findings", "UPDATE findings SET body = NULL"),
    "finding-count-text": _column("findings", "UPDATE findings SET count = 'many'"),
    "finding-count-null": _column("findings", "UPDATE findings SET count = NULL"),
    "write-count-text": _column("write_counts", "UPDATE write_counts SET count = 'lots'"),
    "write-owner-null": _column("write_counts", "UPDATE write_counts SET owner = NULL"),
    "write-owner-a-number": _column("write_counts", "UPDATE write_counts SET owner = 7"),
    "write-op-a-blob": _column("write_counts", "UPDATE write_counts SET op = X'00ff'"),
    "step-end-text": _column("steps", "INSERT INTO steps VALUES (0, 'soon')"),
    "scalar-text-in-real": _column("scalars", "INSERT INTO scalars VALUES (0, 'loss', 'abc')"),
    "grad-norm-text-in-real": lambda run: edit(run, (_PARAM_ROW, (4, "big"))),
    "numel-fraction": lambda run: edit(run, (_PARAM_ROW, (1.5, 1.0))),
    "traced-write-line-text": _column("traced_writes", "UPDATE traced_writes SET line = 'x'"),
    "module-site-a-list": lambda run: edit(
        run, "INSERT INTO module_sites VALUES ('encoder', '[1]')"
    ),
    "module-site-line-text": lambda run: edit(
        run,
        (
            "INSERT INTO module_sites VALUES ('encoder', ?)",
            (json.dumps({"file": "f.py", "line": "2", "function": "f", "code": "c"}),),
        ),
    ),
    "histogram-too-short": lambda run: edit(
        run, "INSERT INTO grad_histograms VALUES (0, 'w', '[1, 2]')"
    ),
    "thread-name-null": _column("threads", "INSERT INTO threads VALUES (1, NULL)"),
    "dead-units-of-none": lambda run: edit(
        run, "INSERT INTO dead_units VALUES (0, 'AdamW.step', 'encoder.1.act', 3, 0)"
    ),
    "a-view-for-a-table": lambda run: edit(
        run, "DROP TABLE threads", "CREATE VIEW threads AS SELECT 1 AS thread, 'main' AS name"
    ),
    "format-zero": _meta("format", "0"),
    # A run of the older format 1 goes through its migration first, on a private copy.
    "format-1-with-a-view-for-a-table": lambda run: edit(
        run,
        "UPDATE meta SET value = '1' WHERE key = 'format'",
        "DROP TABLE param_stats",
        "CREATE VIEW param_stats AS SELECT 0 AS step",
    ),
    "format-1-with-a-text-in-real": lambda run: edit(
        run, "UPDATE meta SET value = '1' WHERE key = 'format'", (_PARAM_ROW, (4, "big"))
    ),
}


@pytest.fixture(scope="module")
def broken_runs(recorded: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every broken variant, each in a directory of its own next to an intact run."""
    runs = {}
    for name, change in BROKEN.items():
        parent = tmp_path_factory.mktemp(name)
        shutil.copytree(recorded, parent / "intact")
        shutil.copytree(recorded, parent / "broken")
        change(parent / "broken")
        runs[name] = parent / "broken"
    return runs


@pytest.mark.parametrize("variant", sorted(BROKEN))
def test_broken_run_gives_one_line_and_exit_2(
    variant: str, broken_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = broken_runs[variant]
    for args in (
        ["report"],
        ["report", "--json"],
        ["report", "--html", str(tmp_path / "r.html")],
        ["tensorboard", "--logdir", str(tmp_path / "tb")],
        ["trace", "--out", str(tmp_path / "trace.json")],
    ):
        assert main([*args, str(broken)]) == 2, args
        _, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.startswith("gradtrace: error: "), (args, err)
        assert "is not a readable gradtrace run" in err, err
        assert "\x1b" not in err
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "trace.json").exists()


@pytest.mark.parametrize("variant", sorted(BROKEN))
def test_ls_lists_a_broken_run_and_goes_on(
    variant: str, broken_runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    broken = broken_runs[variant]
    assert main(["ls", str(broken.parent)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "intact" in out and "broken" in out


def test_broken_run_in_a_subprocess(broken_runs: dict[str, Path]) -> None:
    """The real command line, not only `main`: no traceback, one line, exit 2."""
    for variant in ("status-a-list", "message-null", "body-deeply-nested"):
        done = gradtrace("report", str(broken_runs[variant]), cwd=broken_runs[variant])
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------
# Permissions, read-only media, odd paths


def unprivileged() -> list[str]:
    """A command prefix that runs without root's power to ignore file modes: `unshare -U`
    for root (where the kernel allows it), nothing for anyone else."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-U", "true"], check=False).returncode:
        pytest.skip("running as root, and unshare -U is not available to drop that")
    return [unshare, "-U"]


@pytest.fixture
def read_only(run_dir: Path) -> Iterator[Path]:
    """The run with no write permission anywhere in it: a read-only medium, someone else's."""
    modes = {path: path.stat().st_mode for path in [run_dir, *run_dir.iterdir()]}
    for path in modes:
        path.chmod(0o555 if path.is_dir() else 0o444)
    yield run_dir
    for path, mode in modes.items():
        path.chmod(mode)


def cli_as(prefix: list[str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "gradtrace", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250"},
        check=False,
    )


def test_a_run_without_write_access_is_readable(read_only: Path, tmp_path: Path) -> None:
    prefix = unprivileged()
    done = cli_as(prefix, "report", str(read_only), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "in-place write broke backward" in done.stdout
    assert not (read_only / f"{DATABASE}-shm").exists()
    listed = cli_as(prefix, "ls", str(read_only.parent), cwd=tmp_path)
    assert listed.returncode == 0 and "unreadable" not in listed.stdout


@pytest.mark.parametrize("shm", [True, False], ids=["with-shm", "without-shm"])
def test_a_killed_run_without_write_access_keeps_its_last_commit(
    run_dir: Path, tmp_path: Path, shm: bool
) -> None:
    """A pending write-ahead log (the writer was killed) is read too, without writing, also
    when its shared-memory index did not come along (SQLite would have to create it)."""
    script = (
        "import os, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('PRAGMA wal_autocheckpoint=0')\n"
        "db.execute(\"UPDATE meta SET value = '\\\"interrupted\\\"' WHERE key = 'status'\")\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(run_dir / DATABASE)], check=True)
    assert (run_dir / f"{DATABASE}-wal").stat().st_size > 0
    if not shm:
        (run_dir / f"{DATABASE}-shm").unlink()
    prefix = unprivileged()
    for path in [run_dir, *run_dir.iterdir()]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        done = cli_as(prefix, "report", str(run_dir), cwd=tmp_path)
    finally:
        for path in [run_dir, *run_dir.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert done.returncode == 0, done.stderr
    assert "interrupted" in done.stdout


def test_ls_lists_an_unreadable_directory_and_goes_on(run_dir: Path, tmp_path: Path) -> None:
    prefix = unprivileged()
    locked = run_dir.parent / "locked"
    shutil.copytree(run_dir, locked)
    locked.chmod(0)
    try:
        done = cli_as(prefix, "ls", str(run_dir.parent), cwd=tmp_path)
    finally:
        locked.chmod(0o755)
    assert done.returncode == 0, done.stderr
    (locked_row,) = [line for line in done.stdout.splitlines() if "locked" in line]
    assert "unreadable" in locked_row
    assert "failed (1)" in done.stdout  # the readable run is still listed


def test_a_non_utf8_run_path_opens(recorded: Path, tmp_path: Path) -> None:
    odd = os.fsencode(tmp_path) + b"/run-\xff"
    try:
        os.mkdir(odd)
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    os.rmdir(odd)
    odd_dir = Path(os.fsdecode(odd))
    shutil.copytree(recorded, odd_dir)
    for args in (
        ["report"],
        ["report", "--html", str(tmp_path / "r.html")],
        ["trace"],
        *([["tensorboard"]] if _has_tensorboard() else []),
    ):
        done = run_cli(*args, str(odd_dir), cwd=tmp_path, errors="replace")
        assert done.returncode == 0, (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert "run-?" in (tmp_path / "r.html").read_text(encoding="utf-8")
    if _has_tensorboard():
        assert any((odd_dir / "tensorboard").iterdir())
