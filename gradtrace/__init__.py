"""gradtrace: a debugging profiler for PyTorch training loops."""

from gradtrace.api import Trace, start, trace
from gradtrace.errors import GradtraceError
from gradtrace.events import Finding
from gradtrace.options import RunOptions
from gradtrace.session import Session
from gradtrace.store import Run, load_run

__version__ = "0.1.0"

__all__ = [
    "Finding",
    "GradtraceError",
    "Run",
    "RunOptions",
    "Session",
    "Trace",
    "__version__",
    "load_run",
    "start",
    "trace",
]
