"""The docs hold true: the user guide's Python API snippets run as written (in a temporary
directory), and every relative link in README.md and docs/ leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import gradtrace

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def api_snippets() -> dict[str, list[str]]:
    """The ```python blocks of "## The Python API", by subsection ("" before the first ###)."""
    text = GUIDE.read_text()
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
        exec(compile(source, str(GUIDE), "exec"), namespace)


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


_FENCE = re.compile(r"^```.*?^```$", re.M | re.S)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)


def anchors(markdown: Path) -> set[str]:
    """The anchors GitHub gives the headings of `markdown` (outside code blocks)."""
    found: set[str] = set()
    for heading in _HEADING.findall(_FENCE.sub("", markdown.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in found:  # a repeated heading gets -1, -2, ...
            n += 1
            anchor = f"{slug}-{n}"
        found.add(anchor)
    return found


def relative_links(markdown: Path) -> list[str]:
    """Link targets outside code blocks that are not URLs."""
    links = _LINK.findall(_FENCE.sub("", markdown.read_text()))
    return [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:", link)]


def test_anchor_slugs_follow_github() -> None:
    assert anchors(GUIDE) >= {
        "the-python-api",
        "distributed-training-torchrun-ddp",
        "reports-terminal-tensorboard-html-ls-timeline",
        "gradient-health-what-is-recorded",
    }


def leads_nowhere(link: str, markdown: Path) -> bool:
    """A missing file, or a missing heading in a markdown file."""
    path, _, anchor = link.partition("#")
    target = (markdown.parent / path).resolve() if path else markdown
    if not target.exists():
        return True
    return bool(anchor) and target.suffix == ".md" and anchor not in anchors(target)


def test_link_check_sees_a_missing_file_and_heading(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A `code` heading, too\n")
    assert not leads_nowhere("page.md#a-code-heading-too", page)
    assert not leads_nowhere("#title", page)
    assert leads_nowhere("#no-such-heading", page)
    assert leads_nowhere("other.md", page)


@pytest.mark.parametrize("markdown", DOCS, ids=lambda path: path.name)
def test_relative_links_lead_to_files_and_headings(markdown: Path) -> None:
    assert [link for link in relative_links(markdown) if leads_nowhere(link, markdown)] == []


def test_readme_is_a_door() -> None:
    """README.md stays short: the guide, the findings and the references live in docs/."""
    assert len(README.read_bytes()) < 10_000
    text = README.read_text()
    for command in (
        "scripts/install.sh && python3 -m gradtrace run examples/inplace_bug.py",
        "scripts/install.sh --test && python3 -m pytest -q",
    ):
        assert f"```bash\n{command}\n```" in text
