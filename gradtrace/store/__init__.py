"""The run directory: the single source for every report, live or post-mortem."""

from gradtrace.store.reader import Run, StoredFinding, load_run
from gradtrace.store.writer import RunWriter

__all__ = ["Run", "RunWriter", "StoredFinding", "load_run"]
