"""The pytest plugin, run by pytest's own plugin-testing fixture in a fresh interpreter.

Each inner run loads the plugin as pytest loads it from the entry point, by module name
(with entry-point autoloading off, so the result does not depend on what else is installed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gradtrace import _native
from gradtrace.analysis.culprits import INPLACE_WRITE, SILENT_OVERWRITE
from gradtrace.pytest_plugin import FAILING_KINDS
from gradtrace.store.reader import load_run

pytest_plugins = ["pytester"]

ROOT = Path(__file__).parents[1]
# The native core's build cache, found before pytester points HOME elsewhere: inner runs load
# the core built once instead of building it again (a minute) in each run.
NATIVE_CACHE = _native.build_dir().parent

MODELS = """
import torch
from torch import nn


class Critic(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(2, 8)
        self.score = nn.Linear(8, 1)

    def forward(self, x):
        return self.score(torch.relu(self.hidden(x)))


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        gate = torch.sigmoid(self.gate(x))
        return self.act(gate)
"""

TESTS = """
import pytest
import torch
from models import Critic, Gated


def test_silent_overwrite_passes_untraced():
    critic = Critic()
    optimizer = torch.optim.SGD(critic.parameters(), lr=0.1)
    for _ in range(2):
        loss = critic(torch.randn(8, 2)).mean()
        optimizer.zero_grad()
        for param in critic.parameters():
            param.data.clamp_(-0.05, 0.05)
        loss.backward()
        optimizer.step()


def test_inplace_error():
    Gated()(torch.randn(2, 4)).sum().backward()


def test_healthy():
    critic = Critic()
    optimizer = torch.optim.SGD(critic.parameters(), lr=0.1)
    for _ in range(2):
        critic(torch.randn(8, 2)).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_skipped():
    Critic()(torch.randn(8, 2)).mean().backward()
    pytest.skip("not today")
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A test directory with the models; inner runs load only the plugin under test."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv(_native.CACHE_ENV, str(NATIVE_CACHE))
    pytester.makepyfile(models=MODELS)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "gradtrace.pytest_plugin", "-p", "no:cacheprovider", *args
    )


def test_off_unless_asked_for(inner: pytest.Pytester) -> None:
    """Installed but not asked for: the same outcomes, no run directories, no torch at load."""
    inner.makepyfile(test_models=TESTS)
    inner.makepyfile(
        test_load="""
        import sys

        def test_plugin_loaded_without_torch(request):
            assert request.config.pluginmanager.has_plugin("gradtrace.pytest_plugin")
            assert "torch" not in sys.modules
        """
    )
    run(inner, "test_load.py").assert_outcomes(passed=1)
    result = run(inner, "test_models.py")
    result.assert_outcomes(passed=2, failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*test_models.py::test_inplace_error - RuntimeError: one of*"])
    assert "gradtrace" not in result.stdout.str()
    assert not (inner.path / "gradtrace-runs").exists()


def test_every_test_traced(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_models=TESTS)
    out = inner.path / "runs"
    result = run(inner, "--gradtrace", f"--gradtrace-out={out}", "-v")
    result.assert_outcomes(passed=1, failed=2, skipped=1)
    text = result.stdout.str()

    # Passed on its own, failed by its finding: the finding's text and the run directory.
    silent_dir = out / "test_models.py-test_silent_overwrite_passes_untraced"
    result.stdout.fnmatch_lines(
        [
            "*_ test_silent_overwrite_passes_untraced _*",
            "gradtrace: test_models.py:13 in training loop (clamp_) silently overwrote *",
            "*test_models.py:13 in test_silent_overwrite_passes_untraced",
            "*param.data.clamp_(-0.05, 0.05)",
            f"run directory: {silent_dir}",
        ]
    )
    assert (silent_dir / "trace.json").is_file()

    # Failed by its own error: PyTorch's error with the culprit, the run directory named.
    result.stdout.fnmatch_lines(
        [
            "*_ test_inplace_error _*",
            "E * RuntimeError: one of the variables needed for gradient computation *",
            "E * gradtrace: models.py:23 in act (relu_) overwrote the tensor *",
            "*- Captured gradtrace call -*",
            f"run directory: {out / 'test_models.py-test_inplace_error'}",
        ]
    )
    assert "test_models.py::test_healthy PASSED" in text
    assert (out / "test_models.py-test_healthy" / "trace.json").is_file()
    assert load_run(out / "test_models.py-test_skipped").status == "ok"
    assert load_run(out / "test_models.py-test_inplace_error").status == "failed"
    result.stdout.fnmatch_lines([f"gradtrace: traced 4 tests; runs in {out}"])


def test_fixture_gives_the_test_its_trace(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_fixture="""
        import torch
        from models import Critic, Gated


        def test_gradient_health(gradtrace):
            critic = Critic()
            optimizer = torch.optim.SGD(critic.parameters(), lr=0.1)
            for _ in range(3):
                critic(torch.randn(8, 2)).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
            gradtrace.stop()
            assert not gradtrace.findings
            norms = gradtrace.grad_norms
            assert sorted(norms) == ["hidden", "score"]
            assert [step for step, _ in norms["score"]] == [0, 1, 2]
            assert all(norm > 0 for _, norm in norms["score"])
            assert gradtrace.run_dir.name == "test_fixture.py-test_gradient_health"


        def test_findings_on_the_fixture(gradtrace):
            try:
                Gated()(torch.randn(2, 4)).sum().backward()
            except RuntimeError:
                pass
            gradtrace.stop()
            (finding,) = gradtrace.findings
            assert (finding.kind, finding.op, finding.line) == ("inplace-write", "relu_", 23)


        def test_left_running(gradtrace):
            Critic()(torch.randn(8, 2)).mean().backward()
        """
    )
    inner.makeconftest(
        """
        import gradtrace.session

        def pytest_runtest_teardown(item, nextitem):
            item.config.stash.setdefault("active after", []).append(gradtrace.session.active())

        def pytest_sessionfinish(session):
            assert session.config.stash["active after"] == [None] * 3
        """
    )
    result = run(inner, "-v")
    result.assert_outcomes(passed=3)
    runs = list((inner.path / "gradtrace-runs").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("-pytest")
    assert (runs[0] / "test_fixture.py-test_left_running" / "trace.json").is_file()

    # Under --gradtrace the fixture's trace is the test's trace (one run per test), and the
    # test that caught the in-place error fails by its finding.
    result = run(inner, "--gradtrace", "--gradtrace-out=again")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_findings_on_the_fixture _*",
            "gradtrace: models.py:23 in act (relu_) overwrote the tensor that Gated *",
        ]
    )
    assert len(list((inner.path / "again").iterdir())) == 3


def test_bad_level_is_a_usage_error(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_nothing="def test_nothing(): pass")
    result = run(inner, "--gradtrace", "--gradtrace-level=heavy")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: --gradtrace-level: Unknown level 'heavy'; choose one of light, full."]
    )


def test_entry_point_and_kinds() -> None:
    """pytest finds the plugin by the entry point pyproject declares; the kinds it fails on
    are the analysis's."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["pytest11"] == {
        "gradtrace": "gradtrace.pytest_plugin"
    }
    assert set(FAILING_KINDS) == {INPLACE_WRITE, SILENT_OVERWRITE}
