"""The real `gradtrace` CLI in a subprocess: run it, or SIGKILL it mid-training as a crash would."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def gradtrace(*args: str, cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """`python -m gradtrace ARGS` in `cwd`, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "gradtrace", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def kill_when_ready(args: list[str], cwd: Path) -> None:
    """Start `python -m gradtrace ARGS`; SIGKILL it once the script prints a 'ready' line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gradtrace", *args], cwd=cwd, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
