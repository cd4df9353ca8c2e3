"""The terminal summary: what went wrong, the line that did it, and what to do."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from gradtrace.analysis.grad_health import FOUND_INF, ClipStep, scaler_skips
from gradtrace.analysis.report import Report
from gradtrace.events import Finding
from gradtrace.reporters.finding_text import (
    across_ranks,
    checkpointed_text,
    silenced_text,
    steps_text,
    title,
)
from gradtrace.reporters.html import is_flat
from gradtrace.reporters.plain import Plain
from gradtrace.reporters.rank_rows import rank_rows
from gradtrace.store.format import OK
from gradtrace.store.reader import Run, StoredFinding

# Owners listed in the "in-place writes" table.
TOP_OWNERS = 8

_SPARKS = "▁▂▃▄▅▆▇█"
# Points shown in a sparkline: the most recent recorded steps.
SPARK_WIDTH = 24


class ModulePath:
    """A module path that, in a cell too narrow for it, is shortened from its start.

    Its end names the module: `m.e.layers.1.linear1` or `…1.linear1`, never rich's
    `encoder.layers.1.linea…`.
    """

    def __init__(self, path: str, style: str = "magenta") -> None:
        self.path = path
        self.style = style

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        width = cell_len(self.path)
        return Measurement(min(width, MIN_PATH_WIDTH), width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text(shorten_path(self.path, options.max_width), style=self.style, no_wrap=True)


# The narrowest a ModulePath asks to be: an ellipsis and a few characters of the name.
MIN_PATH_WIDTH = 8


def shorten_path(path: str, width: int) -> str:
    """`path` in at most `width` cells, keeping its end.

    Leading dotted parts shrink to their first letter first, left to right (numbers, the
    index of a layer, stay whole); then the start is cut off behind "…".
    """
    if cell_len(path) <= width:
        return path
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        if not part.isdigit():
            parts[i] = part[:1]
            shorter = ".".join(parts)
            if cell_len(shorter) <= width:
                return shorter
    return cut_left(".".join(parts), width)


def cut_left(text: str, width: int) -> str:
    """`text` in at most `width` cells: "…" and its end when it does not fit."""
    if cell_len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    kept, used = len(text), 1
    while kept > 0 and used + cell_len(text[kept - 1]) <= width:
        kept -= 1
        used += cell_len(text[kept])
    return "…" + text[kept:]


class TerminalReporter:
    """Renders a `Report` to a rich console. Pure: reads the report, prints, nothing else.

    Stored strings go into `Text` (never markup), and everything printed goes through
    `Plain`, which keeps their control characters off the terminal.
    """

    def __init__(self, console: Console) -> None:
        self._console = console

    def render(self, report: Report) -> None:
        run, findings = report.run, report.findings
        self._print(_headline(run, len(findings), len(report.silenced)))
        for notice in run.meta.get("notices") or []:
            self._print(Text.assemble(("note: ", "bold yellow"), notice))
        for failure in run.probe_failures:
            self._print(Text.assemble(("probe failed: ", "bold red"), failure.describe()))
        checkpointed = run.meta.get("checkpointed")
        if checkpointed:
            self._print(Text.assemble(("checkpointed: ", "bold"), checkpointed_text(checkpointed)))
        if run.ranks:
            self._print(_ranks_table(run, findings))
        for stored, ranks in across_ranks(findings):
            self._print(_finding_panel(stored, ranks))
        # A job's series are rank 0's: after the all-reduce every rank holds the same gradients.
        # Sharded parameters (FSDP2, tensor parallel) are every rank's shards combined.
        of_rank = " (rank 0)" if run.ranks else ""
        if any(stats.params for stats in run.grad_steps):
            combined = "; sharded parameters: all ranks combined"
            shards = combined if run.meta.get("param_shards") else ""
            self._print(_health_table(report, f" (rank 0{shards})" if of_rank else ""))
        if run.write_counts:
            self._print(_write_table(run, of_rank))
        self._print(Text.assemble(("run directory: ", "dim"), str(run.path)))

    def _print(self, renderable: RenderableType) -> None:
        self._console.print(Plain(renderable))


def _headline(run: Run, findings: int, silenced: int) -> Text:
    meta = run.meta
    argv = " ".join(meta.get("argv") or [])
    status = run.status
    style = "green" if status == OK else "red"
    exit_code = meta.get("exit_code")
    status_text = status if exit_code in (None, 0) else f"{status} (exit {exit_code})"
    skipped, _ = scaler_skips(run.scalars.get(FOUND_INF, []))
    amp = f" · GradScaler skipped {skipped} (normal)" if skipped else ""
    ranks = f" · {len(run.ranks)} ranks" if run.ranks else ""
    return Text.assemble(
        ("gradtrace ", "bold"),
        (argv, "bold"),
        "  ",
        (status_text, style),
        f" · level {meta.get('level')}{ranks} · {steps_text(run.steps, meta)}{amp} · "
        f"{run.writes} in-place writes · ",
        (f"{findings} finding{'s' if findings != 1 else ''}", "bold red" if findings else "green"),
        silenced_text(silenced),
    )


def _ranks_table(run: Run, findings: Sequence[StoredFinding]) -> Table:
    table = Table(title="ranks", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("node", justify="right")
    table.add_column("host", overflow="ellipsis", no_wrap=True, max_width=24)
    table.add_column("status")
    table.add_column("steps", justify="right")
    table.add_column("findings", justify="right")
    table.add_column("error")
    for row in rank_rows(run, findings):
        table.add_row(
            str(row.rank),
            "" if row.node is None else str(row.node),
            Text(row.host),
            Text(row.status, style="green" if row.ok else "red"),
            str(row.steps),
            str(row.findings),
            Text(row.error, overflow="ellipsis", no_wrap=True),
        )
    return table


def _finding_panel(stored: StoredFinding, ranks: list[int]) -> Panel:
    finding = stored.finding
    parts: list[RenderableType] = [Text(finding.message, style="bold")]
    # A write names its op: one that corrupted a saved tensor, or one autograd refused.
    if not finding.saved_by and finding.op is None:
        parts.extend(_gradient_parts(finding))
    elif finding.file is not None:
        parts.append(
            Text.assemble(
                ("wrote: ", "dim"),
                (f"{finding.file}:{finding.line}", "cyan"),
                f" in {finding.function}() · module ",
                (str(finding.module), "magenta"),
                f" · op {finding.op} · {finding.phase} of step {finding.step}",
            )
        )
        parts.append(_excerpt(finding))
    if finding.saved_by:
        parts.append(_saved_line(finding))
    for other in finding.other_writes:
        parts.append(
            Text(
                f"also wrote: {_short(other.get('file'))}:{other.get('line')} "
                f"({other.get('op')} in {other.get('module')})",
                style="dim",
            )
        )
    parts.append(Text.assemble(("fix: ", "bold green"), finding.hint))
    repeat = f" · seen {stored.count}×" if stored.count > 1 else ""
    on_ranks = ""
    if ranks:
        on_ranks = f" · rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
    return Panel(
        Group(*parts),
        title=Text.assemble((title(finding.kind), "bold red"), f"{repeat}{on_ranks}"),
        title_align="left",
        border_style="red",
    )


def _gradient_parts(finding: Finding) -> list[RenderableType]:
    where = Text()
    if finding.module is not None:
        where.append("module ", style="dim")
        where.append(finding.module, style="magenta")
        where.append(" · ")
    if finding.parameter:
        where.append("parameter ")
        where.append(finding.parameter, style="magenta")
    where.append(f"{' · ' if finding.parameter else ''}step {finding.step}")
    if finding.file is None:
        return [where]
    where.append(" · at ")
    where.append(f"{finding.file}:{finding.line}", style="cyan")
    return [where, _excerpt(finding)]


def _excerpt(finding: Finding) -> RenderableType:
    if not finding.context:
        return Text(f"    {finding.code}")
    return Syntax(
        "\n".join(finding.context),
        "python",
        line_numbers=True,
        start_line=finding.context_start,
        highlight_lines={finding.line},
        theme="ansi_dark",
        background_color="default",
    )


def _saved_line(finding: Finding) -> Text:
    saved = finding.saved_by
    shape = "×".join(str(n) for n in saved.get("shape", [])) or "scalar"
    text = Text.assemble(
        ("corrupted: ", "dim"),
        f"{saved.get('dtype')}[{shape}] on {saved.get('device')}",
        f" saved by {saved.get('node')} in module ",
        (str(saved.get("module")), "magenta"),
    )
    if saved.get("parameter"):
        text.append(" (parameter ")
        text.append(str(saved["parameter"]), style="magenta")
        text.append(")")
    if saved.get("file"):
        text.append(" at ")
        text.append(f"{_short(saved['file'])}:{saved['line']}", style="cyan")
        text.append(f"  {saved.get('code')}", style="dim")
    text.append(f" · version {saved.get('version_saved')} → {saved.get('version_now')}")
    return text


def _health_table(report: Report, of_rank: str) -> Table:
    norms, clips = report.norms, report.clips
    updates = norms.update_ratio
    last_step = report.run.grad_steps[-1].step
    table = Table(
        title=f"gradient health{of_rank} (grad L2 norm; last recorded step {last_step})",
        title_justify="left",
        caption=_clip_caption(clips),
        caption_justify="left",
    )
    table.add_column("module")
    table.add_column("‖grad‖", justify="right")
    table.add_column("‖grad‖/‖param‖", justify="right")
    if updates:
        table.add_column("‖Δp‖/‖p‖", justify="right")
    table.add_column(f"last {SPARK_WIDTH} steps")
    blank = [""] if updates else []
    if clips:
        before = [(c.step, c.norm_before) for c in clips]
        last_before = _number(before[-1][1])
        table.add_row("(global, before clip)", last_before, "", *blank, _sparkline(before))
    label = "(global, after clip)" if clips else "(global)"
    global_grad = norms.global_grad
    table.add_row(label, _number(global_grad[-1][1]), "", *blank, _sparkline(global_grad))
    ranked = sorted(norms.grad, key=lambda m: _sort_key(norms.grad[m][-1][1]), reverse=True)
    for module in ranked[:TOP_OWNERS]:
        series = norms.grad[module]
        taken = norms.param.get(module)  # sampled: the latest
        param = taken[-1][1] if taken else math.nan
        ratio = series[-1][1] / param if param else math.nan
        update = [_number(updates[module][-1][1]) if module in updates else ""] if updates else []
        table.add_row(
            ModulePath(module),
            _number(series[-1][1]),
            _number(ratio),
            *update,
            _sparkline(series),
        )
    hidden = len(ranked) - TOP_OWNERS
    if hidden > 0:
        table.add_row(f"… {hidden} more", "", "", *blank, "")
    return table


def _clip_caption(clips: list[ClipStep]) -> str | None:
    """How often clip_grad_norm_ actually clipped: every step means it sets the step size."""
    if not clips:
        return None
    clipped = sum(c.clipped for c in clips)
    low, high = min(c.max_norm for c in clips), max(c.max_norm for c in clips)
    limit = _number(low) if low == high else f"{_number(low)}…{_number(high)}"
    return (
        f"clip_grad_norm_(max_norm={limit}) clipped on {clipped} of {len(clips)} recorded "
        "steps that called it"
    )


def _sort_key(value: float) -> float:
    return math.inf if not math.isfinite(value) else value


def _number(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def _sparkline(series: list[tuple[int, float]]) -> Text:
    """Log-scaled bars, a flat series (`is_flat`) level; non-finite values as a red '!'."""
    values = [v for _, v in series[-SPARK_WIDTH:]]
    positive = [v for v in values if math.isfinite(v) and v > 0]
    flat = not positive or is_flat(min(positive), max(positive))
    low, high = (0.0, 0.0) if flat else (math.log10(min(positive)), math.log10(max(positive)))
    text = Text()
    for v in values:
        if not math.isfinite(v):
            text.append("!", style="bold red")
        elif v <= 0:
            text.append(" ")
        else:
            # A flat series is a level line mid-height, not noise stretched to full height.
            level = 0.5 if flat else (math.log10(v) - low) / (high - low)
            text.append(_SPARKS[round(level * (len(_SPARKS) - 1))], style="cyan")
    return text


def _write_table(run: Run, of_rank: str) -> Table:
    table = Table(
        title=f"in-place writes{of_rank} (legal unless listed above)", title_justify="left"
    )
    table.add_column("owner")
    table.add_column("op")
    table.add_column("phase")
    table.add_column("count", justify="right")
    for owner, op, phase, count in run.write_counts[:TOP_OWNERS]:
        table.add_row(ModulePath(owner), Text(op), Text(phase), str(count))
    hidden = len(run.write_counts) - TOP_OWNERS
    if hidden > 0:
        table.add_row(f"… {hidden} more", "", "", "")
    return table


def _short(path: str | None) -> str:
    return os.path.basename(path) if path else "?"
