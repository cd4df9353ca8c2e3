"""Run gradtrace in a subprocess and SIGKILL it mid-training, as a crash would."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


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
