"""How every reporter names a finding: its title, its facts and its code excerpt.

Markup-neutral: callers say how to set an identifier (`<code>` for HTML, backticks for
markdown), so the terminal, HTML and TensorBoard reports say the same things.
"""

from __future__ import annotations

from collections.abc import Callable

from gradtrace.events import Finding

TITLES = {
    "inplace-write": "in-place write broke backward",
    "silent-overwrite": "silent overwrite: wrong gradients, no error",
    "non-finite": "gradients went NaN/Inf",
    "exploding": "exploding gradients",
    "vanishing": "vanishing gradients",
    "no-grad": "parameters never get a gradient",
    "dead-units": "dead ReLU units",
}


def title(kind: str) -> str:
    return TITLES.get(kind, kind)


def finding_facts(finding: Finding, code: Callable[[object], str]) -> list[str]:
    """Where the finding is and what it corrupted, one sentence each; `code` sets names."""
    facts = []
    if finding.module is not None:
        where = f"module {code(finding.module)}"
        if finding.parameter:
            where += f" · parameter {code(finding.parameter)}"
        if finding.op:
            where += f" · op {code(finding.op)}"
        phase = f"{finding.phase} of " if finding.phase else ""
        facts.append(f"{where} · {phase}step {finding.step}")
    if finding.file is not None:
        facts.append(f"at {code(f'{finding.file}:{finding.line}')} in {code(finding.function)}")
    saved = finding.saved_by
    if saved:
        at = f" at {code(_place(saved))}" if saved.get("file") else ""
        facts.append(
            f"corrupted: tensor saved by {code(saved.get('node'))} in module "
            f"{code(saved.get('module'))}{at} (version {saved.get('version_saved')} → "
            f"{saved.get('version_now')})"
        )
    for other in finding.other_writes:
        facts.append(
            f"also wrote: {code(_place(other))} "
            f"({code(other.get('op'))} in {code(other.get('module'))})"
        )
    return facts


def _place(where: dict[str, object]) -> str:
    return f"{where.get('file')}:{where.get('line')}"


def code_excerpt(finding: Finding) -> list[str]:
    """Numbered source lines around the finding, the culprit line marked with `>`."""
    if not finding.context:
        return [f"> {finding.line} | {finding.code}"] if finding.code else []
    width = len(str(finding.context_start + len(finding.context)))
    return [
        f"{'>' if n == finding.line else ' '} {n:>{width}} | {text}"
        for n, text in enumerate(finding.context, start=finding.context_start)
    ]
