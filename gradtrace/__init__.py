"""gradtrace: a debugging profiler for PyTorch training loops."""

from gradtrace.api import Trace, start, trace
from gradtrace.errors import GradtraceError
from gradtrace.events import Finding
from gradtrace.session import Session
from gradtrace.silencing import ignore
from gradtrace.store import Run, load_run

__version__ = "0.1.0"

__all__ = [
    "Finding",
    "GradtraceError",
    "Run",
    "Session",
    "Trace",
    "__version__",
    "ignore",
    "load_run",
    "start",
    "trace",
]
