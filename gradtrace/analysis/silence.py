"""Findings the user silenced on purpose, as linters allow: counted, never shown as findings.

Two ways, both about the line a finding points at:

- a `# gradtrace: ignore[KIND, ...]` comment on that line (`# gradtrace: ignore` for every
  kind), read from the line as stored with the finding, so a run directory mailed to
  someone else is silenced the same way;
- `with gradtrace.ignore(KIND, ...):` around it: the session stores the block's lines (file,
  first and last line, kinds) in the run's meta as `ignored`, and a finding pointing inside
  a block is silenced.

Pure: findings and stored facts in, the two lists out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gradtrace.events import Finding
from gradtrace.store.reader import StoredFinding

COMMENT = "comment"
CONTEXT_MANAGER = "gradtrace.ignore"

# `# gradtrace: ignore` or `# gradtrace: ignore[inplace-write, silent-overwrite]`.
_IGNORE = re.compile(r"#\s*gradtrace:\s*ignore\b(?:\[(?P<kinds>[^\]]*)\])?")


@dataclass(frozen=True)
class Region:
    """Lines `start`..`end` of `file` inside a `with gradtrace.ignore(...)` block."""

    file: str
    start: int
    end: int
    # Empty: every kind.
    kinds: tuple[str, ...]

    def covers(self, finding: Finding) -> bool:
        return (
            finding.file == self.file
            and finding.line is not None
            and self.start <= finding.line <= self.end
            and (not self.kinds or finding.kind in self.kinds)
        )


@dataclass(frozen=True)
class SilencedFinding:
    stored: StoredFinding
    # COMMENT or CONTEXT_MANAGER.
    by: str


def comment_kinds(code: str | None) -> tuple[str, ...] | None:
    """The kinds a `# gradtrace: ignore[...]` comment in this line names (empty: all), or
    None when the line has no such comment."""
    match = _IGNORE.search(code or "")
    if match is None:
        return None
    return tuple(kind for kind in re.split(r"[,\s]+", match["kinds"] or "") if kind)


def regions(meta: dict[str, Any]) -> list[Region]:
    """The `ignored` blocks a run's meta holds; malformed entries (meta is anyone's JSON)
    silence nothing."""
    found = []
    for entry in meta.get("ignored") or []:
        if not isinstance(entry, dict):
            continue
        file, start, end, kinds = (entry.get(k) for k in ("file", "start", "end", "kinds"))
        if (
            isinstance(file, str)
            and isinstance(start, int)
            and isinstance(end, int)
            and isinstance(kinds, list)
            and all(isinstance(kind, str) for kind in kinds)
        ):
            found.append(Region(file, start, end, tuple(kinds)))
    return found


def silenced_by(finding: Finding, blocks: Sequence[Region]) -> str | None:
    """How the finding is silenced, or None when it is shown."""
    kinds = comment_kinds(finding.code)
    if kinds is not None and (not kinds or finding.kind in kinds):
        return COMMENT
    if any(block.covers(finding) for block in blocks):
        return CONTEXT_MANAGER
    return None


def split_silenced(
    findings: Iterable[StoredFinding], blocks: Sequence[Region]
) -> tuple[list[StoredFinding], list[SilencedFinding]]:
    """(findings to show, findings silenced), each in the order given."""
    shown: list[StoredFinding] = []
    silenced: list[SilencedFinding] = []
    for stored in findings:
        by = silenced_by(stored.finding, blocks)
        if by is None:
            shown.append(stored)
        else:
            silenced.append(SilencedFinding(stored, by))
    return shown, silenced
