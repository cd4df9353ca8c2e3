"""`with gradtrace.ignore("inplace-write"):` silences findings that point inside the block."""

from __future__ import annotations

import sys
from types import TracebackType

from gradtrace import session
from gradtrace.errors import GradtraceError
from gradtrace.probes import ignored
from gradtrace.reporters.finding_text import TITLES


class ignore:
    """Silence findings of `kinds` (every kind when none is given) whose line lies in the
    `with` block, as a `# gradtrace: ignore[KIND]` comment on each of its lines would.

    Training is not touched: the findings are still derived, then counted as silenced in the
    summary and listed under `silenced` in the JSON report instead of shown. Lexical, like
    a linter's suppression: a write in a function called from the block points at that
    function's line, outside the block; put the comment there.
    """

    def __init__(self, *kinds: str) -> None:
        unknown = [kind for kind in kinds if kind not in TITLES]
        if unknown:
            raise GradtraceError(
                f"Unknown finding kind '{unknown[0]}'; choose from {', '.join(TITLES)}."
            )
        self.kinds = kinds
        # The blocks this object is inside now (it may be entered again while inside).
        self._blocks: list[dict[str, object]] = []

    def __enter__(self) -> ignore:
        caller = sys._getframe(1)
        self._blocks.append(ignored.enter(caller.f_code.co_filename, caller.f_lineno, self.kinds))
        running = session.active()
        if running is not None:
            running.store_ignored()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ignored.leave(self._blocks.pop())
