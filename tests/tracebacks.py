"""Read tracebacks in captured stderr by what they show, not by where this checkout lies.

A clone's directory is usually named `gradtrace`, so "gradtrace" appears in the path of
every test script: tests look for frames of the gradtrace package and for its attribution
lines instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import gradtrace

PACKAGE_DIR = str(Path(gradtrace.__file__).resolve().parent) + os.sep

# gradtrace's attribution after PyTorch's message, and its one-line notices.
_ATTRIBUTION = re.compile(r"^gradtrace: ", re.MULTILINE)


def frame_files(stderr: str) -> list[str]:
    """The file of every traceback frame in `stderr`, in order."""
    return re.findall(r'^  File "(.*)", line \d+', stderr, re.MULTILINE)


def gradtrace_frames(stderr: str) -> list[str]:
    """Traceback frames in gradtrace's own code."""
    return [file for file in frame_files(stderr) if file.startswith(PACKAGE_DIR)]


def has_attribution(stderr: str) -> bool:
    return _ATTRIBUTION.search(stderr) is not None
