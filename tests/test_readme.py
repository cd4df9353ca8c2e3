"""The README's Python API snippets run as written (in a temporary directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import gradtrace

README = Path(__file__).parents[1] / "README.md"


def api_snippets() -> dict[str, list[str]]:
    """The ```python blocks of "## The Python API", by subsection ("" before the first ###)."""
    text = README.read_text()
    start = text.index("## The Python API")
    end = text.index("\n## ", start + 1)
    snippets: dict[str, list[str]] = {}
    heading = ""
    pattern = re.compile(r"^### ([^\n]+)$|^```python\n(.*?)^```$", re.M | re.S)
    for match in pattern.finditer(text[start:end]):
        if match.group(1) is not None:
            heading = match.group(1).strip()
        else:
            snippets.setdefault(heading, []).append(match.group(2))
    return snippets


def run_snippets(sources: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(cwd)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for source in sources:
        exec(compile(source, str(README), "exec"), namespace)


def test_sections_have_snippets() -> None:
    assert set(api_snippets()) == {"", "Lightning", "Hugging Face Trainer"}


def test_api_snippets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_snippets(api_snippets()[""], tmp_path, monkeypatch)
    for name in ("debug", "manual"):
        run = gradtrace.load_run(tmp_path / "runs" / name)
        assert (run.status, run.findings) == ("ok", [])
    assert gradtrace.load_run(tmp_path / "runs" / "debug").steps == 3
    [decorated] = (tmp_path / "gradtrace-runs").iterdir()
    assert decorated.name.endswith("-train")


def test_lightning_snippet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lightning.pytorch")
    snippets = api_snippets()
    run_snippets([snippets[""][0], *snippets["Lightning"]], tmp_path, monkeypatch)
    run = gradtrace.load_run(tmp_path / "runs" / "lightning")
    assert (run.status, run.steps, run.findings) == ("ok", 8, [])


def test_hf_snippet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    snippets = api_snippets()
    run_snippets([snippets[""][0], *snippets["Hugging Face Trainer"]], tmp_path, monkeypatch)
    run = gradtrace.load_run(tmp_path / "runs" / "hf")
    assert (run.status, run.steps, run.findings) == ("ok", 2, [])
