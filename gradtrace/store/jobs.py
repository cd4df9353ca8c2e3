"""Store work off the training thread: reading a step's values late and writing them.

NOTE [why a thread]: at every step end the session reads the values queued a step earlier
(on CUDA it waits for their event), turns them into records and writes them to SQLite.
The training loop need not wait for that Python and I/O: on a GPU machine its thread goes
on launching the next step, and on a CPU the work overlaps with ops that release the GIL.
One worker keeps the jobs in order. At most MAX_IN_FLIGHT jobs wait, so a store slower
than training holds the loop back instead of piling up records.

NOTE [at exit]: the interpreter stops every executor's worker before `atexit` handlers run,
and a session may be closed from one (see hf.py); its last job therefore runs on the
caller's thread (`run_here`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

MAX_IN_FLIGHT = 2


class StoreJobs:
    """Runs store jobs in order on one thread; a job's error is raised on the caller's."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradtrace-store")
        self._in_flight: deque[Future[None]] = deque()

    def submit(self, job: Callable[..., None], *args: Any) -> None:
        while len(self._in_flight) >= MAX_IN_FLIGHT:
            self._in_flight.popleft().result()
        self._in_flight.append(self._executor.submit(job, *args))

    def wait(self) -> None:
        """Return once every job submitted so far has run (raising the first error)."""
        while self._in_flight:
            self._in_flight.popleft().result()

    def run_here(self, job: Callable[..., None], *args: Any) -> None:
        """Run a job on the caller's thread, after every job submitted before it."""
        self.wait()
        job(*args)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)
