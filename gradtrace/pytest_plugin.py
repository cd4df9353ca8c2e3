"""pytest plugin: `pytest --gradtrace` traces every test; the `gradtrace` fixture gives a test
its own trace.

pytest loads this module (entry point `pytest11`) in every test run of an environment where
gradtrace is installed, so it is off unless asked for: without `--gradtrace` or the fixture
it traces nothing, prints nothing and imports neither torch nor the rest of gradtrace (they
are imported where a test asks for tracing). `-p no:gradtrace` switches it off entirely.

Under `--gradtrace` a test whose run has an in-place or silent-overwrite finding fails with
the finding's text and the run directory, even when the test itself passed: a silent
overwrite raises nothing, yet the gradients it produced are wrong.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from gradtrace.api import Trace

# Findings that fail a test under --gradtrace: the gradients are wrong, raised or not.
# (gradtrace.analysis.culprits.INPLACE_WRITE and SILENT_OVERWRITE; a test checks they match.)
FAILING_KINDS = ("inplace-write", "silent-overwrite")

# A test's run directory is named after its node id, cut to this many characters.
MAX_NAME = 120

_FIXTURE_TRACE = pytest.StashKey["Trace"]()
_RUNS_DIR = pytest.StashKey[Path]()
_TRACED = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradtrace", "gradtrace (debugging profiler for PyTorch training)")
    group.addoption(
        "--gradtrace",
        action="store_true",
        default=False,
        help="Trace every test with gradtrace; a test whose run has an in-place or "
        "silent-overwrite finding fails.",
    )
    group.addoption(
        "--gradtrace-out",
        metavar="DIR",
        default=None,
        help="Where the tests' run directories go, one per test "
        "(default ./gradtrace-runs/<time>-pytest).",
    )
    group.addoption(
        "--gradtrace-level",
        metavar="LEVEL",
        default="full",
        help="full (default; names the writing line) or light.",
    )


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("gradtrace"):
        return
    from gradtrace.errors import GradtraceError
    from gradtrace.options import RunOptions

    try:  # checked where every option is: RunOptions
        RunOptions(level=config.getoption("gradtrace_level"))
    except GradtraceError as error:
        raise pytest.UsageError(f"--gradtrace-level: {error}") from None


@pytest.fixture
def gradtrace(request: pytest.FixtureRequest) -> Iterator[Trace]:
    """This test's own trace, already started (as `gradtrace.start()` returns it).

    Call `stop()` before asserting on what the whole run found (gradient findings are
    derived when the run ends): `assert not gradtrace.findings`, `gradtrace.grad_norms`.
    """
    from gradtrace.api import Trace

    trace = Trace(
        out=_run_dir(request.node),
        front_end="pytest",
        level=request.config.getoption("gradtrace_level"),
    ).start()
    request.node.stash[_FIXTURE_TRACE] = trace
    try:
        yield trace
    finally:
        trace.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Trace the test's call (under --gradtrace, or through its fixture) and judge the run."""
    every = item.config.getoption("gradtrace")
    trace = item.stash.get(_FIXTURE_TRACE, None)
    if trace is None and not every:
        return (yield)
    if trace is None:
        from gradtrace.api import Trace

        level = item.config.getoption("gradtrace_level")
        trace = Trace(out=_run_dir(item), front_end="pytest", level=level).start()
    if every:
        item.config.stash[_TRACED] = item.config.stash.get(_TRACED, 0) + 1
    try:
        result = yield
    except pytest.skip.Exception:
        trace.stop()  # a skip is no failure of the run
        raise
    except BaseException as error:
        trace.stop(exception=error)  # the finding that explains it becomes a note
        item.add_report_section("call", "gradtrace", f"run directory: {trace.run_dir}")
        raise
    trace.stop()
    if every:
        _fail_on_findings(trace)
    return result


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    config = terminalreporter.config
    traced = config.stash.get(_TRACED, 0)
    if traced:
        where = config.stash[_RUNS_DIR]
        tests = f"{traced} test{'s' if traced != 1 else ''}"
        terminalreporter.write_line(f"gradtrace: traced {tests}; runs in {where}")


def _fail_on_findings(trace: Trace) -> None:
    """Fail the test with the text of every in-place and silent-overwrite finding."""
    from gradtrace.analysis.culprits import explain

    wrong = [finding for finding in trace.findings if finding.kind in FAILING_KINDS]
    if wrong:
        text = "\n\n".join(explain(finding) for finding in wrong)
        pytest.fail(f"{text}\n\nrun directory: {trace.run_dir}", pytrace=False)


def _run_dir(item: pytest.Item) -> Path:
    """A new directory for this test's run: the runs' folder, then the test's node id."""
    config = item.config
    runs = config.stash.get(_RUNS_DIR, None)
    if runs is None:
        out = config.getoption("gradtrace_out")
        here = config.invocation_params.dir
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        runs = here / (out if out is not None else f"gradtrace-runs/{stamp}-pytest")
        config.stash[_RUNS_DIR] = runs
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", item.nodeid).strip("-.")[:MAX_NAME] or "test"
    candidate, n = runs / name, 1
    while candidate.exists():
        n += 1
        candidate = runs / f"{name}-{n}"
    return candidate
