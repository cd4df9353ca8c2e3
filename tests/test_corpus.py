"""The in-place bug corpus, run through the real CLI against plain `python`.

Every bug script marks its culprit line with a trailing comment

    # expect: kind=inplace-write op=relu_ module=encoder.layers.1.act

and, where the saving line is the user's, the line that saved the corrupted tensor with

    # saved-by: node=SigmoidBackward0 module=encoder.layers.1

Those markers are the whole expectation: file and line come from where the marker sits.
Clean scripts print a `DIGEST ...` line of exact bit patterns that must not change under
gradtrace.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import attached_hooks
from cores import CORES
from tracebacks import frame_files, gradtrace_frames, has_attribution

from gradtrace._native import CORE_ENV
from gradtrace.cli import main as gradtrace_main
from gradtrace.session import Session

CORPUS = Path(__file__).resolve().parent / "corpus"
BUGS = sorted(CORPUS.glob("bugs/[!_]*.py"))
CLEAN = sorted(CORPUS.glob("clean/[!_]*.py"))

PYTORCH_MESSAGE = (
    "one of the variables needed for gradient computation has been modified by an inplace operation"
)
# The exception line of a traceback: "RuntimeError: one of the variables ...".
_EXCEPTION_LINE = re.compile(
    r"^(?P<type>[A-Za-z_][\w.]*): (?P<message>" + PYTORCH_MESSAGE + ".*)$", re.M
)
_MARKER = re.compile(r"#\s*(?P<tag>expect|saved-by):\s*(?P<fields>.*)$")
_LOUD_KIND = "inplace-write"
_SILENT_KIND = "silent-overwrite"
TIMEOUT_S = 60


@dataclass(frozen=True)
class Marker:
    line: int
    fields: dict[str, str]


@dataclass(frozen=True)
class Expectation:
    script: Path
    culprit: Marker
    saved_by: Marker | None


def parse_markers(script: Path) -> Expectation:
    found: dict[str, list[Marker]] = {"expect": [], "saved-by": []}
    for number, text in enumerate(script.read_text().splitlines(), start=1):
        match = _MARKER.search(text)
        if match is None:
            continue
        fields = {}
        for pair in match["fields"].split():
            key, _, value = pair.partition("=")
            fields[key] = value
        # Values may hold spaces ("training loop"): a field runs until the next key=.
        fields = dict(re.findall(r"(\w+)=(.*?)(?=\s+\w+=|$)", match["fields"].strip()))
        found[match["tag"]].append(Marker(number, fields))
    assert len(found["expect"]) == 1, f"{script.name}: needs exactly one '# expect:' marker"
    assert len(found["saved-by"]) <= 1, f"{script.name}: at most one '# saved-by:' marker"
    saved = found["saved-by"][0] if found["saved-by"] else None
    return Expectation(script, found["expect"][0], saved)


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def _start(argv: list[str], cwd: Path, core: str | None = None) -> subprocess.Popen[str]:
    # One intra-op thread each: a plain and a traced run share the cores side by side, and
    # both see the same setting, so their results stay comparable bit for bit.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if core is not None:
        env[CORE_ENV] = core
    return subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen[str]) -> Outcome:
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"{process.args} ran past {TIMEOUT_S} s\n{stderr}")
    return Outcome(process.returncode, stdout, stderr)


def run_both(
    script: Path, run_dir: Path, *extra: str, core: str | None = None
) -> tuple[Outcome, Outcome]:
    """Run the script with plain python and under `gradtrace run` (on `core`), side by side."""
    cwd = script.parent
    plain = _start([sys.executable, str(script)], cwd)
    traced = _start(
        [sys.executable, "-m", "gradtrace", "run", "--out", str(run_dir), *extra, str(script)],
        cwd,
        core,
    )
    return _finish(plain), _finish(traced)


def report_json(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    """`gradtrace report RUN --json`, through the CLI's own entry point (torch is loaded)."""
    capsys.readouterr()
    code = gradtrace_main(["report", str(run_dir), "--json"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    return json.loads(printed.out)


def exception_of(stderr: str) -> tuple[str, str]:
    """(type, message) of the in-place error a traceback ends with."""
    matches = list(_EXCEPTION_LINE.finditer(stderr))
    assert matches, f"no in-place error in stderr:\n{stderr}"
    return matches[-1]["type"], matches[-1]["message"]


def _ids(paths: list[Path]) -> list[str]:
    return [path.stem for path in paths]


def test_corpus_is_complete():
    assert len(BUGS) >= 12
    assert len(CLEAN) >= 5
    kinds = {parse_markers(script).culprit.fields["kind"] for script in BUGS}
    assert kinds == {_LOUD_KIND, _SILENT_KIND}


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("script", BUGS, ids=_ids(BUGS))
def test_bug_is_named(script: Path, core: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Both cores name the same write, saver and lines: the markers are the one expectation."""
    expected = parse_markers(script)
    culprit = expected.culprit.fields
    run_dir = tmp_path / "run"
    plain, traced = run_both(script, run_dir, core=core)

    if culprit["kind"] == _LOUD_KIND:
        assert plain.returncode == 1, plain.stderr
        assert traced.returncode == 1, traced.stderr
        plain_type, plain_message = exception_of(plain.stderr)
        traced_type, traced_message = exception_of(traced.stderr)
        assert traced_type == plain_type
        # PyTorch's own words, byte for byte: same tensor, node, output number and versions.
        assert traced_message == plain_message
        assert has_attribution(traced.stderr)
        # Plain python: PyTorch's error alone, no attribution, no frame of gradtrace's.
        assert not has_attribution(plain.stderr), plain.stderr
        assert frame_files(plain.stderr) and not gradtrace_frames(plain.stderr)
    else:
        # Probes must not change behaviour: a silent bug stays silent, the output the same.
        assert plain.returncode == 0, plain.stderr
        assert traced.returncode == 0, traced.stderr
        assert traced.stdout == plain.stdout

    report = report_json(run_dir, capsys)
    assert report["run"]["core"] == core
    # Gradient-health findings may come too (not this corpus's subject); in-place: exactly one.
    findings = [f for f in report["findings"] if f["kind"] in (_LOUD_KIND, _SILENT_KIND)]
    assert len(findings) == 1, json.dumps(findings, indent=2)
    finding = findings[0]
    got = {key: finding[key] for key in ("kind", "file", "line", "op", "module")}
    want = {
        "kind": culprit["kind"],
        "file": str(script),
        "line": expected.culprit.line,
        "op": culprit["op"],
        "module": culprit["module"],
    }
    assert got == want, finding["message"]

    saved_by = finding["saved_by"]
    assert saved_by["node"] and saved_by["module"] and saved_by["line"], saved_by
    if expected.saved_by is not None:
        saved = expected.saved_by.fields
        assert saved_by["file"] == str(script)
        assert saved_by["line"] == expected.saved_by.line
        assert saved_by["node"] == saved["node"]
        assert saved_by["module"] == saved["module"]
        if "parameter" in saved:
            assert saved_by["parameter"] == saved["parameter"]


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("script", CLEAN, ids=_ids(CLEAN))
def test_clean_script_is_untouched(
    script: Path, core: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run_dir = tmp_path / "run"
    plain, traced = run_both(script, run_dir, core=core)
    assert plain.returncode == 0, plain.stderr
    assert traced.returncode == 0, traced.stderr
    digests = [line for line in plain.stdout.splitlines() if line.startswith("DIGEST ")]
    assert len(digests) == 1, plain.stdout
    # Observer effect: losses, parameters, optimizer state and RNG state bit for bit.
    assert traced.stdout == plain.stdout

    report = report_json(run_dir, capsys)
    assert report["findings"] == []
    assert report["run"]["status"] == "ok"
    assert report["run"]["exit_code"] == 0


def test_light_level_names_the_saved_tensor_only(tmp_path: Path):
    """Without the write log: PyTorch's error still, the saved tensor named, no culprit line.

    This test also runs `report --json` in its own process: the one end-to-end check with no
    in-process shortcut.
    """
    script = CORPUS / "bugs" / "relu_after_sigmoid.py"
    expected = parse_markers(script)
    run_dir = tmp_path / "run"
    gradtrace = [sys.executable, "-m", "gradtrace"]
    traced = _finish(
        _start(
            [*gradtrace, "run", "--out", str(run_dir), "--level", "light", str(script)], tmp_path
        )
    )
    # test_bug_is_named[relu_after_sigmoid] shows plain python raises this, exit code 1.
    assert traced.returncode == 1, traced.stderr
    assert exception_of(traced.stderr)[0] == "RuntimeError"

    reported = _finish(_start([*gradtrace, "report", str(run_dir), "--json"], tmp_path))
    assert reported.returncode == 0, reported.stderr
    (finding,) = json.loads(reported.stdout)["findings"]
    assert finding["kind"] == _LOUD_KIND
    assert finding["file"] is None
    assert finding["line"] is None
    assert finding["op"] is None
    saved_by = finding["saved_by"]
    assert saved_by["file"] == str(script)
    assert saved_by["line"] == expected.saved_by.line
    assert saved_by["node"] == expected.saved_by.fields["node"]
    assert saved_by["module"] == expected.saved_by.fields["module"]
    assert "--level full" in finding["hint"]


def _plain_loud_bug() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.sigmoid(x)
    y.mul_(2)
    y.sum().backward()


def test_session_removes_every_hook_after_a_failed_run(tmp_path: Path):
    script = CORPUS / "bugs" / "relu_after_sigmoid.py"
    session = Session(tmp_path / "run")
    with pytest.raises(RuntimeError, match="gradtrace:") as raised, session:
        assert attached_hooks() != []
        runpy.run_path(str(script), run_name="__main__")
    assert PYTORCH_MESSAGE in str(raised.value)
    assert len(session.findings) == 1

    assert attached_hooks() == []
    with pytest.raises(RuntimeError, match=PYTORCH_MESSAGE) as plain:
        _plain_loud_bug()
    assert "gradtrace:" not in str(plain.value)
