"""Deliberate writes silenced as linters allow: counted as silenced, never shown as findings."""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path

import pytest
import torch
from cli_process import gradtrace as gradtrace_cli
from cores import CORES

import gradtrace
from gradtrace._native import CORE_ENV
from gradtrace.analysis.report import build_report
from gradtrace.session import Session
from gradtrace.store import load_run

SILENT = "silent-overwrite"

# A write through .data into what exp() saved: a silent-overwrite finding at the marked line.
SCRIPT = """\
import torch

x = torch.randn(8, requires_grad=True)
for _ in range(2):
    h = torch.exp(x)
    h.data.mul_(0.5)  {comment}
    h.sum().backward()
"""


def _run(tmp_path: Path, comment: str, core: str) -> tuple[list[str], list[tuple[str, str]]]:
    script = tmp_path / "deliberate.py"
    script.write_text(SCRIPT.format(comment=comment))
    with Session(tmp_path / "run", core=core):
        runpy.run_path(str(script))
    report = build_report(load_run(tmp_path / "run"))
    shown = [stored.finding.kind for stored in report.findings]
    silenced = [(s.stored.finding.kind, s.by) for s in report.silenced]
    return shown, silenced


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize(
    ("comment", "silenced"),
    [
        ("", False),
        ("# gradtrace: ignore[silent-overwrite]", True),
        ("# deliberate  # gradtrace: ignore[inplace-write, silent-overwrite]", True),
        ("# gradtrace: ignore", True),
        ("# gradtrace: ignore[inplace-write]", False),  # another kind
    ],
)
def test_an_ignore_comment_on_the_writing_line_silences_its_kinds(
    tmp_path: Path, core: str, comment: str, silenced: bool
) -> None:
    shown, quiet = _run(tmp_path, comment, core)
    if silenced:
        assert (shown, quiet) == ([], [(SILENT, "comment")])
    else:
        assert (shown, quiet) == ([SILENT], [])


def _deliberate(x: torch.Tensor, kind: str) -> torch.Tensor:
    h = torch.exp(x)
    with gradtrace.ignore(kind):
        h.data.mul_(0.5)
    return h.sum()


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize(("kind", "silenced"), [(SILENT, True), ("inplace-write", False)])
def test_a_gradtrace_ignore_block_silences_the_writes_inside_it(
    tmp_path: Path, core: str, kind: str, silenced: bool
) -> None:
    x = torch.randn(8, requires_grad=True)
    with Session(tmp_path / "run", core=core) as session:
        _deliberate(x, kind).backward()
    run = load_run(tmp_path / "run")
    quiet = [(s.stored.finding.kind, s.by) for s in build_report(run).silenced]
    if silenced:
        assert (session.findings, quiet) == ([], [(SILENT, "gradtrace.ignore")])
    else:
        assert ([f.kind for f in session.findings], quiet) == ([SILENT], [])
    # Nothing changes for the user's code: the write happened as written.
    assert run.meta["ignored"] and all(b["file"] == __file__ for b in run.meta["ignored"])


def test_an_unknown_kind_is_refused_where_it_is_written() -> None:
    with pytest.raises(gradtrace.GradtraceError, match="Unknown finding kind 'inplace-wirte'"):
        gradtrace.ignore("inplace-wirte")


def test_silenced_findings_are_counted_in_the_summary_json_and_html(tmp_path: Path) -> None:
    (tmp_path / "deliberate.py").write_text(
        SCRIPT.format(comment="# gradtrace: ignore[silent-overwrite]")
    )
    env = {**os.environ, CORE_ENV: "python", "COLUMNS": "200"}
    traced = gradtrace_cli("run", "--out", "run", "deliberate.py", cwd=tmp_path, env=env)
    assert traced.returncode == 0, traced.stderr
    assert "0 findings · 1 finding silenced" in traced.stderr
    report = json.loads(gradtrace_cli("report", "run", "--json", cwd=tmp_path).stdout)
    assert report["findings"] == []
    (silenced,) = report["silenced"]
    assert (silenced["kind"], silenced["by"], silenced["line"]) == (SILENT, "comment", 6)
    html = tmp_path / "r.html"
    assert gradtrace_cli("report", "run", "--html", str(html), cwd=tmp_path).returncode == 0
    assert "1 finding silenced" in html.read_text()
