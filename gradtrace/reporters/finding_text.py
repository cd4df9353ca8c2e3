"""How every reporter names a finding: its title, its facts and its code excerpt.

Markup-neutral: callers say how to set an identifier (`<code>` for HTML, backticks for
markdown), so the terminal, HTML and TensorBoard reports say the same things.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gradtrace.events import Finding
from gradtrace.store.reader import StoredFinding

TITLES = {
    "inplace-write": "in-place write broke backward",
    "silent-overwrite": "silent overwrite: wrong gradients, no error",
    "inplace-refused": "in-place write refused by autograd",
    "non-finite": "gradients went NaN/Inf",
    "exploding": "exploding gradients",
    "vanishing": "vanishing gradients",
    "no-grad": "parameters never get a gradient",
    "rank-divergence": "ranks disagree",
    "dead-units": "dead ReLU units",
    "all-gradients-zero": "every gradient is zero: nothing learns",
    "no-grad-parameter-write": "warning: parameter written under no_grad inside a forward",
    "graph-cut": "graph cut: a value left the graph before the loss",
}


def title(kind: str) -> str:
    return TITLES.get(kind, kind)


def finding_facts(
    finding: Finding, code: Callable[[object], str], text: Callable[[str], str] = str
) -> list[str]:
    """Where the finding is and what it corrupted, one sentence each; `code` sets names and
    `text` escapes the other stored words (HTML and markdown must escape every one)."""
    facts = []
    if finding.module is not None:
        where = f"module {code(finding.module)}"
        if finding.parameter:
            where += f" · parameter {code(finding.parameter)}"
        if finding.op:
            where += f" · op {code(finding.op)}"
        phase = f"{text(finding.phase)} of " if finding.phase else ""
        on_rank = f" · rank {finding.rank}" if finding.rank is not None else ""
        facts.append(f"{where} · {phase}step {finding.step}{on_rank}")
    if finding.file is not None:
        facts.append(f"at {code(f'{finding.file}:{finding.line}')} in {code(finding.function)}")
    output_of = finding.details.get("output_of")
    if output_of:
        facts.append(f"corrupted: the output of module {code(output_of)} (untracked write)")
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


def checkpointed_text(checkpointed: dict[str, str]) -> str:
    """What activation checkpointing means for a run's checks, naming the modules."""
    names = list(checkpointed)
    shown = ", ".join(f"{name} ({how})" for name, how in list(checkpointed.items())[:8])
    more = f", and {len(names) - 8} more" if len(names) > 8 else ""
    return (
        f"{len(names)} module{'s' if len(names) != 1 else ''} ran under activation "
        f"checkpointing: {shown}{more}. torch.utils.checkpoint keeps their activations, so "
        "gradtrace does not watch those; writes to a region's inputs are still caught."
    )


def steps_text(steps: int, meta: dict[str, object]) -> str:
    """ "N steps", and the rule that counted them when it is not optimizer steps."""
    text = f"{steps} step{'s' if steps != 1 else ''}"
    if meta.get("steps_counted_by") == "backward":
        text += " (counted by backward passes: no optimizer stepped)"
    return text


def silenced_text(silenced: int) -> str:
    """ " · N findings silenced" (by ignore comments or blocks), or nothing."""
    if not silenced:
        return ""
    return f" · {silenced} finding{'s' if silenced != 1 else ''} silenced"


def across_ranks(findings: Sequence[StoredFinding]) -> list[tuple[StoredFinding, list[int]]]:
    """Findings with the ranks that recorded them: one entry for the same bug on every rank.

    The same in-place bug usually fires on every rank of a job; showing it once with "ranks
    0, 1, 2, 3" is what a reader wants. Order is first appearance; ranks are None-free.
    """
    grouped: dict[tuple[object, ...], tuple[StoredFinding, list[int]]] = {}
    for stored in findings:
        finding = stored.finding
        # Gradient findings share their module's line: module and parameter tell them apart.
        key = (*finding.same_bug, finding.module, finding.parameter)
        _, ranks = grouped.setdefault(key, (stored, []))
        if finding.rank is not None:
            ranks.append(finding.rank)
    return list(grouped.values())
