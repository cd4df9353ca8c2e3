"""The post-mortem HTML report: one self-contained file (inline CSS and SVG, no network).

Pictures where people would rather look than read: a module × step heat map of gradient
norms, the global norm curve, the run's own scalars, and in-place writes per owner (totals
and per step). Findings come first, with their code excerpts and fixes. Pure: a `Run` in,
a string out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from html import escape
from pathlib import Path

from gradtrace.analysis.grad_health import ModuleNorms
from gradtrace.analysis.report import Report
from gradtrace.errors import GradtraceError
from gradtrace.reporters.finding_text import (
    checkpointed_text,
    code_excerpt,
    finding_facts,
    silenced_text,
    steps_text,
    title,
)
from gradtrace.reporters.rank_rows import rank_rows
from gradtrace.store.format import OK
from gradtrace.store.reader import Run, StoredFinding

# Heat maps show at most this many step columns (wider runs are binned: the worst value of
# each bin, so a NaN or a spike is never averaged away) and this many rows.
MAX_COLUMNS = 240
MAX_ROWS = 120
CELL_HEIGHT = 14
LABEL_WIDTH = 260
PLOT_WIDTH = 860
# A series whose values differ by less than this fraction of their size is drawn flat:
# stretching 0.249997…0.250001 to the chart's height would show noise as a swing.
FLAT_SPREAD = 1e-3
# How far above and below a flat series the chart's axis reaches, as a fraction of its value.
FLAT_MARGIN = 0.1
# Viridis, five stops: low norms dark blue, high norms yellow.
_PALETTE = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
_NONFINITE = "#d62728"
_EMPTY = "#e4e4e4"

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px;
       color: #1d1d1f; background: #fff; max-width: 1160px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; }
.meta { color: #555; } .ok { color: #1a7f37; } .bad { color: #c62828; font-weight: 600; }
.finding { border: 1px solid #e0b4b4; border-left: 5px solid #c62828; border-radius: 6px;
           padding: 10px 14px; margin: 12px 0; background: #fffafa; }
.finding h3 { margin: 0 0 6px; font-size: 15px; color: #c62828; }
.finding .message { font-weight: 600; } .finding ul { margin: 6px 0; padding-left: 18px; }
.fix { color: #1a7f37; }
pre.code { background: #f6f8fa; border: 1px solid #e5e7eb; border-radius: 4px;
           padding: 8px; overflow-x: auto; font: 12.5px/1.4 ui-monospace, Menlo, monospace; }
pre.code .hit { background: #ffe0e0; display: inline-block; width: 100%; }
code { font: 12.5px ui-monospace, Menlo, monospace; background: #f6f8fa; padding: 0 3px; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; }
th { border-bottom: 1px solid #ccc; } td.n { text-align: right; }
.legend { color: #555; font-size: 12px; } .none { color: #777; }
.cell-info { color: #333; font-size: 12px; min-height: 16px; }
.raised, .finding .message { white-space: pre-wrap; overflow-wrap: anywhere; }
"""

# Hovering a heat-map cell names it below the map (the SVG <title> also shows a tooltip).
_JS = """
document.querySelectorAll("svg.heatmap").forEach(function (svg) {
  var info = svg.parentNode.querySelector(".cell-info");
  svg.addEventListener("mouseover", function (event) {
    var cell = event.target;
    if (cell.classList && cell.classList.contains("cell") && info) {
      info.textContent = cell.getAttribute("data-label");
    }
  });
});
"""


def render_html(report: Report) -> str:
    """The whole report as one HTML document."""
    run, findings, norms = report.run, report.findings, report.norms
    sections = [
        _header(run, findings, len(report.silenced)),
        *([_ranks_section(run, findings)] if run.ranks else []),
        _findings_section(findings),
        _section(
            "Global gradient norm",
            _line_chart(norms.global_grad, "‖grad‖ (L2, all parameters)", log=True),
        ),
        *_clipping_sections(report),
        _section(
            "Gradient norm per module × step",
            _heatmap(norms.grad, "gradient L2 norm", log=True, unit="‖grad‖"),
        ),
        *_update_sections(norms),
        *(
            _section(f"Scalar: {name}", _line_chart(series, name, log=_spans_decades(series)))
            for name, series in sorted(run.scalars.items())
        ),
        _section("In-place writes per owner", _write_bars(run) + _write_timeline(run)),
    ]
    title = f"gradtrace · {' '.join(run.meta.get('argv') or [str(run.path)])}"
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>"
        + "".join(sections)
        + f"<script>{_JS}</script></body></html>\n"
    )


def _clipping_sections(report: Report) -> list[str]:
    """The norm clip_grad_norm_ saw, when the run called it (the curve above is after it)."""
    clips = report.clips
    if not clips:
        return []
    clipped = sum(c.clipped for c in clips)
    chart = _line_chart(
        [(c.step, c.norm_before) for c in clips], "‖grad‖ before clip_grad_norm_", log=True
    )
    note = (
        f"<p class='legend'>Clipped on {clipped} of {len(clips)} recorded steps that called "
        f"clip_grad_norm_ (max_norm {_number(min(c.max_norm for c in clips))}); the curve "
        "above is the norm after clipping.</p>"
    )
    return [_section("Global gradient norm before clipping", chart + note)]


def _update_sections(norms: ModuleNorms) -> list[str]:
    """‖Δp‖/‖p‖ per module × step, for runs recorded with update_ratio."""
    if not norms.update_ratio:
        return []
    heatmap = _heatmap(norms.update_ratio, "update ratio ‖Δp‖/‖p‖", log=True, unit="‖Δp‖/‖p‖")
    return [_section("Update ratio per module × step", heatmap)]


def write_html(report: Report, out: Path) -> Path:
    """Write the report; text that is no valid Unicode (a non-UTF-8 run path) shows as '?'."""
    try:
        out.write_text(render_html(report), encoding="utf-8", errors="replace")
    except OSError as error:
        raise GradtraceError(
            f"Cannot write the HTML report to '{out}': {error.strerror}."
        ) from None
    return out


def _section(title: str, body: str) -> str:
    return f"<section><h2>{escape(title)}</h2>{body}</section>"


def _header(run: Run, findings: Sequence[StoredFinding], silenced: int) -> str:
    meta = run.meta
    argv = " ".join(meta.get("argv") or [])
    exit_code = meta.get("exit_code")
    status = run.status if exit_code in (None, 0) else f"{run.status} (exit {exit_code})"
    started = meta.get("started_ns")
    when = (
        datetime.fromtimestamp(started / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        if isinstance(started, int)
        else "?"
    )
    count = len(findings)
    facts = [
        f"<span class='{'ok' if run.status == OK else 'bad'}'>{escape(status)}</span>",
        f"level {escape(str(meta.get('level')))}",
        *([f"{len(run.ranks)} ranks"] if run.ranks else []),
        steps_text(run.steps, meta),
        f"{run.writes} in-place writes",
        f"<span class='{'bad' if count else 'ok'}'>{count} finding{'s' if count != 1 else ''}"
        "</span>",
        *([silenced_text(silenced).removeprefix(" · ")] if silenced else []),
        f"started {when}",
        f"torch {escape(str(meta.get('torch')))}",
    ]
    exception = meta.get("exception")
    raised = (
        f"<p class='bad raised'>{escape(exception.get('type', ''))}: "
        f"{escape(exception.get('message', ''))}</p>"
        if isinstance(exception, dict)
        else ""
    )
    checkpointed = meta.get("checkpointed")
    if checkpointed:
        raised += f"<p class='meta'>{escape(checkpointed_text(checkpointed))}</p>"
    return (
        f"<header><h1>gradtrace <code>{escape(argv)}</code></h1>"
        f"<div class='meta'>{' · '.join(facts)}</div>"
        f"<div class='meta'>run directory: <code>{escape(str(run.path))}</code></div>"
        f"{raised}</header>"
    )


def _ranks_section(run: Run, findings: Sequence[StoredFinding]) -> str:
    rows = "".join(
        f"<tr><td>{row.rank}</td><td>{'' if row.node is None else row.node}</td>"
        f"<td>{escape(row.host)}</td><td class='{'ok' if row.ok else 'bad'}'>{escape(row.status)}"
        f"</td><td>{row.steps}</td><td>{row.findings}</td><td>{escape(row.error)}</td></tr>"
        for row in rank_rows(run, findings)
    )
    columns = ("rank", "node", "host", "status", "steps", "findings", "error")
    head = "<tr>" + "".join(f"<th>{column}</th>" for column in columns) + "</tr>"
    return _section("Ranks", f"<table>{head}{rows}</table>")


def _findings_section(findings: Sequence[StoredFinding]) -> str:
    if not findings:
        return _section("Findings", "<p class='ok'>No findings.</p>")
    return _section("Findings", "".join(_finding_card(stored) for stored in findings))


def render_findings(findings: Sequence[StoredFinding]) -> str:
    """The findings section alone, as one HTML document (a notebook shows a list of findings)."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<style>{_CSS}</style></head><body>{_findings_section(findings)}</body></html>\n"
    )


def _finding_card(stored: StoredFinding) -> str:
    finding = stored.finding
    seen = f" · seen {stored.count}×" if stored.count > 1 else ""
    facts = finding_facts(finding, lambda name: f"<code>{escape(str(name))}</code>", escape)
    excerpt = "\n".join(
        f"<span class='hit'>{escape(line)}</span>" if line.startswith(">") else escape(line)
        for line in code_excerpt(finding)
    )
    code = f"<pre class='code'>{excerpt}</pre>" if excerpt else ""
    items = "".join(f"<li>{fact}</li>" for fact in facts)
    return (
        f"<div class='finding' data-kind='{escape(finding.kind)}'>"
        f"<h3>{escape(title(finding.kind))}{seen}</h3>"
        f"<div class='message'>{escape(finding.message)}</div><ul>{items}</ul>{code}"
        f"<div class='fix'><b>fix:</b> {escape(finding.hint)}</div></div>"
    )


def _line_chart(series: Sequence[tuple[int, float]], label: str, *, log: bool) -> str:
    """A polyline over steps; log scale when asked and every finite value is positive."""
    if not series:
        return "<p class='none'>Nothing recorded.</p>"
    finite = [v for _, v in series if math.isfinite(v)]
    log = log and bool(finite) and min(finite) > 0
    values = [math.log10(v) if log and math.isfinite(v) else v for _, v in series]
    low, high = _plot_range(finite or [0.0], log=log)
    steps = [step for step, _ in series]
    first, last = steps[0], max(steps[-1], steps[0] + 1)
    width, height, left, top = PLOT_WIDTH, 180, 70, 10
    plot_h = height - 40

    def x(step: int) -> float:
        return left + (step - first) / (last - first) * (width - left - 10)

    def y(value: float) -> float:
        return top + (high - value) / (high - low) * plot_h

    points = " ".join(
        f"{x(step):.1f},{y(v):.1f}"
        for step, v in zip(steps, values, strict=True)
        if math.isfinite(v)
    )
    bad = "".join(
        f"<circle class='nonfinite' cx='{x(step):.1f}' cy='{top + 4}' r='4' fill='{_NONFINITE}'>"
        f"<title>step {step}: {raw}</title></circle>"
        for step, (_, raw) in zip(steps, series, strict=True)
        if not math.isfinite(raw)
    )
    dots = "".join(
        f"<circle cx='{x(step):.1f}' cy='{y(v):.1f}' r='2' fill='#1f77b4'>"
        f"<title>step {step}: {_number(raw)}</title></circle>"
        for step, v, (_, raw) in zip(steps, values, series, strict=True)
        if math.isfinite(v) and len(series) <= 400
    )

    high_tick, low_tick = _distinct(*((10**v if log else v) for v in (high, low)))
    axis = (
        f"<line x1='{left}' y1='{top}' x2='{left}' y2='{top + plot_h}' stroke='#999'/>"
        f"<line x1='{left}' y1='{top + plot_h}' x2='{width - 10}' y2='{top + plot_h}' "
        "stroke='#999'/>"
        f"<text x='{left - 6}' y='{top + 10}' text-anchor='end'>{high_tick}</text>"
        f"<text x='{left - 6}' y='{top + plot_h}' text-anchor='end'>{low_tick}</text>"
        f"{_step_labels(first, steps[-1], left, top + plot_h + 16, width - 10 - left)}"
        f"<text x='{(left + width) / 2:.0f}' y='{top + plot_h + 16}' text-anchor='middle'>"
        f"{escape(label)}"
        f"{' (log scale)' if log else ''}</text>"
    )
    return (
        f"<svg class='chart' width='{width}' height='{height}' role='img' "
        f"aria-label='{escape(label)}'>{axis}"
        f"<polyline points='{points}' fill='none' stroke='#1f77b4' stroke-width='1.5'/>"
        f"{dots}{bad}</svg>"
    )


def _plot_range(finite: list[float], *, log: bool) -> tuple[float, float]:
    """The value axis's (low, high), in plotted units (log10 when `log`).

    A flat series (FLAT_SPREAD) gets an axis FLAT_MARGIN around its middle, so it is drawn
    as a level line mid-chart between two labels that differ.
    """
    low, high = min(finite), max(finite)
    if is_flat(low, high):
        middle = (low + high) / 2
        margin = abs(middle) * FLAT_MARGIN or 1.0
        low, high = middle - margin, middle + margin
    if log:
        return math.log10(low), math.log10(high)
    return low, high


def is_flat(low: float, high: float) -> bool:
    """Whether values from `low` to `high` differ by under FLAT_SPREAD of their size: drawn
    as a level line (here and in the terminal's sparklines), not stretched to full height."""
    return high - low <= FLAT_SPREAD * max(abs(low), abs(high))


def _distinct(high: float, low: float) -> tuple[str, str]:
    """Axis labels for two different values, with as many digits as it takes to tell them
    apart (3 significant digits unless the values are closer)."""
    for digits in range(3, 17):
        high_text, low_text = f"{high:.{digits}g}", f"{low:.{digits}g}"
        if high_text != low_text:
            return high_text, low_text
    return _number(high), _number(low)


def _spans_decades(series: Sequence[tuple[int, float]]) -> bool:
    """Log scale for a scalar (a loss) whose positive values span over two decades."""
    finite = [v for _, v in series if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 100


def _heatmap(rows: dict[str, list[tuple[int, float]]], label: str, *, log: bool, unit: str) -> str:
    """Rows × step columns, colored by value (log10 when `log`); NaN/Inf red."""
    if not rows:
        return "<p class='none'>Nothing recorded.</p>"
    names = list(rows)[:MAX_ROWS]
    steps = sorted({step for series in rows.values() for step, _ in series})
    bins = _bins(steps)
    grid: dict[str, list[float | None]] = {}
    for name in names:
        by_step = dict(rows[name])
        grid[name] = [_worst([by_step[s] for s in group if s in by_step]) for group in bins]
    finite = [
        math.log10(v) if log else v
        for cells in grid.values()
        for v in cells
        if v is not None and math.isfinite(v) and (v > 0 or not log)
    ]
    low, high = _color_range(finite)
    cell_w = max(2.0, min(24.0, PLOT_WIDTH / len(bins)))
    width = LABEL_WIDTH + cell_w * len(bins) + 10
    height = CELL_HEIGHT * len(names) + 34
    parts = []
    for row, name in enumerate(names):
        y = row * CELL_HEIGHT
        parts.append(
            f"<text x='{LABEL_WIDTH - 6}' y='{y + CELL_HEIGHT - 3}' text-anchor='end'>"
            f"{escape(_clip(name))}<title>{escape(name)}</title></text>"
        )
        for col, value in enumerate(grid[name]):
            group = bins[col]
            when = f"step {group[0]}" if len(group) == 1 else f"steps {group[0]}–{group[-1]}"
            shown = "no value" if value is None else _number(value)
            parts.append(
                f"<rect class='cell' x='{LABEL_WIDTH + col * cell_w:.1f}' y='{y}' "
                f"width='{cell_w:.1f}' height='{CELL_HEIGHT - 1}' "
                f"fill='{_color(value, low, high, log=log)}' "
                f"data-label='{escape(name)} · {when} · {unit} {shown}'>"
                f"<title>{escape(name)} · {when} · {unit} {shown}</title></rect>"
            )
    bottom = CELL_HEIGHT * len(names) + 14
    parts.append(_step_labels(steps[0], steps[-1], LABEL_WIDTH, bottom, cell_w * len(bins)))
    scale = "log10 " if log else ""
    low_text = _number(10**low if log else low)
    high_text = _number(10**high if log else high)
    hidden = len(rows) - len(names)
    more = f" · {hidden} more rows not shown" if hidden > 0 else ""
    binned = (
        f" · {len(steps)} steps in {len(bins)} columns (worst value each)"
        if len(bins) < len(steps)
        else ""
    )
    legend = (
        f"<div class='legend'>{escape(label)}, {scale}color: "
        f"<span style='color:rgb{_PALETTE[0]}'>■</span> ≤ {low_text} … "
        f"<span style='color:rgb{_PALETTE[-1]}'>■</span> ≥ {high_text} · "
        f"<span style='color:{_NONFINITE}'>■</span> NaN/Inf · "
        f"<span style='color:{_EMPTY}'>■</span> no value{binned}{more}</div>"
    )
    return (
        f"<div class='heatmap-box'><svg class='heatmap' width='{width:.0f}' height='{height}' "
        f"role='img' aria-label='{escape(label)}'>{''.join(parts)}</svg>{legend}"
        "<div class='cell-info'></div></div>"
    )


# Room one "step N" label takes under a heat map, in pixels (11 px text).
STEP_LABEL_WIDTH = 70


def _step_labels(first: int, last: int, x: float, y: float, plot_width: float) -> str:
    """ "step first" at the left and "step last" at the right of a plot starting at `x`;
    where the two would overlap (one step, or a few narrow columns), one label for both."""
    if first != last and plot_width >= 2 * STEP_LABEL_WIDTH:
        return (
            f"<text x='{x}' y='{y}'>step {first}</text>"
            f"<text x='{x + plot_width}' y='{y}' text-anchor='end'>step {last}</text>"
        )
    steps = f"step {first}" if first == last else f"steps {first}–{last}"
    return f"<text x='{x}' y='{y}'>{steps}</text>"


def _color_range(values: list[float]) -> tuple[float, float]:
    """The 2nd to 98th percentile once there are enough values: one spike must not turn
    every other cell the same dark color (it still shows, saturated)."""
    if not values:
        return 0.0, 1.0
    ordered = sorted(values)
    if len(ordered) < 50:
        return ordered[0], ordered[-1]
    return ordered[len(ordered) // 50], ordered[-1 - len(ordered) // 50]


def _bins(steps: list[int]) -> list[list[int]]:
    if len(steps) <= MAX_COLUMNS:
        return [[step] for step in steps]
    size = math.ceil(len(steps) / MAX_COLUMNS)
    return [steps[i : i + size] for i in range(0, len(steps), size)]


def _worst(values: list[float]) -> float | None:
    """Non-finite first, then the largest: a spike or a NaN is never averaged away."""
    if not values:
        return None
    bad = [v for v in values if not math.isfinite(v)]
    return bad[0] if bad else max(values)


def _color(value: float | None, low: float, high: float, *, log: bool) -> str:
    if value is None:
        return _EMPTY
    if not math.isfinite(value):
        return _NONFINITE
    if log and value <= 0:
        return "rgb(20,20,20)"
    v = math.log10(value) if log else value
    t = 0.0 if high == low else min(1.0, max(0.0, (v - low) / (high - low)))
    position = t * (len(_PALETTE) - 1)
    i = min(int(position), len(_PALETTE) - 2)
    frac = position - i
    a, b = _PALETTE[i], _PALETTE[i + 1]
    r, g, bl = (round(a[k] + (b[k] - a[k]) * frac) for k in range(3))
    return f"rgb({r},{g},{bl})"


def _write_bars(run: Run) -> str:
    totals: dict[str, int] = {}
    for owner, _op, _phase, count in run.write_counts:
        totals[owner] = totals.get(owner, 0) + count
    if not totals:
        return "<p class='none'>No in-place writes recorded.</p>"
    ranked = sorted(totals.items(), key=lambda item: item[1], reverse=True)[:MAX_ROWS]
    most = ranked[0][1] or 1
    bar_w = PLOT_WIDTH - LABEL_WIDTH
    rows = []
    for i, (owner, count) in enumerate(ranked):
        y = i * 18
        w = max(1.0, count / most * (bar_w - 60))
        rows.append(
            f"<text x='{LABEL_WIDTH - 6}' y='{y + 13}' text-anchor='end'>{escape(_clip(owner))}"
            f"</text><rect class='bar' x='{LABEL_WIDTH}' y='{y + 2}' width='{w:.1f}' "
            f"height='14' fill='#ff7f0e'><title>{escape(owner)}: {count}</title></rect>"
            f"<text x='{LABEL_WIDTH + w + 4:.1f}' y='{y + 13}'>{count}</text>"
        )
    table_rows = "".join(
        f"<tr><td><code>{escape(owner)}</code></td><td><code>{escape(op)}</code></td>"
        f"<td>{escape(phase)}</td><td class='n'>{count}</td></tr>"
        for owner, op, phase, count in run.write_counts
    )
    return (
        f"<svg class='bars' width='{PLOT_WIDTH}' height='{len(ranked) * 18 + 4}'>"
        f"{''.join(rows)}</svg>"
        "<p class='legend'>Legal unless listed under Findings.</p>"
        "<details><summary>by op and phase</summary><table><tr><th>owner</th><th>op</th>"
        f"<th>phase</th><th>count</th></tr>{table_rows}</table></details>"
    )


def _write_timeline(run: Run) -> str:
    per_owner: dict[str, dict[int, float]] = {}
    for step, owner, _op, _phase, count in run.step_write_counts:
        counts = per_owner.setdefault(owner, {})
        counts[step] = counts.get(step, 0) + count
    if not per_owner:
        return ""
    rows = {owner: sorted(counts.items()) for owner, counts in per_owner.items()}
    return "<h2>In-place writes per owner × step</h2>" + _heatmap(
        rows, "in-place writes", log=False, unit="writes"
    )


def _clip(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def _number(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)
