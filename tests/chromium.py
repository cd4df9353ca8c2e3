"""Headless Chromium for the HTML tests: the browser, and its command line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium")

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium (apt-get install chromium)"
)


def chromium_command(page: Path, profile: Path, *options: str) -> list[str]:
    """Open `page` headless in a throwaway profile, with `options` (what to produce)."""
    assert CHROMIUM is not None
    return [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *options,
        page.resolve().as_uri(),
    ]
