"""Stored text as the terminal shows it: never markup, never a control sequence.

A run directory can come from anyone, and every string in it (module names, ops, argv, the
exception's message, the path) ends up on someone's terminal. Reporters build rich `Text`
(never markup strings) from stored values; `Plain` then strips, from everything a renderable
prints, the characters a terminal would act on (escape sequences that set the title, clear
the screen or make hyperlinks, bells, carriage returns) and replaces what cannot be encoded
(lone surrogates from a non-UTF-8 path). One wrapper around what a reporter prints does it
for every string inside, piped or not.
"""

from __future__ import annotations

import re

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.measure import Measurement
from rich.segment import Segment

# C0 controls but the newline rich lays lines out with, DEL, and C1 controls (0x9b is CSI).
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def strip_controls(text: str) -> str:
    """`text` without terminal control characters; unencodable surrogates as U+FFFD."""
    return _SURROGATE.sub("\ufffd", _CONTROL.sub("", text))


class Plain:
    """Wraps a renderable so that no control character of its text reaches the terminal.

    rich's own control segments (cursor moves of a live display) pass unchanged; styles are
    applied by the console after this, so colours still work.
    """

    def __init__(self, renderable: RenderableType) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for segment in console.render(self.renderable, options):
            if segment.control:
                yield segment
            else:
                yield Segment(strip_controls(segment.text), segment.style)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.renderable)
