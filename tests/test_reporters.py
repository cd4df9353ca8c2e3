"""Reporters on hand-built runs, at a fixed console width."""

from __future__ import annotations

import math
import re
from pathlib import Path

from events_factory import evidence, write
from rich.console import Console

from gradtrace.analysis.culprits import diagnose
from gradtrace.analysis.report import build_report
from gradtrace.events import ClipCall, ParamStat, StepGradStats
from gradtrace.reporters.html import render_html
from gradtrace.reporters.json_report import render_json
from gradtrace.reporters.terminal import TerminalReporter, cut_left, shorten_path
from gradtrace.store.reader import Run, StoredFinding


def sample_run() -> Run:
    finding = diagnose(evidence((write("relu_"), write("add_", seq=1))))
    assert finding is not None
    return Run(
        path=Path("/runs/demo"),
        meta={"status": "failed", "exit_code": 1, "argv": ["train.py"], "level": "full"},
        findings=[StoredFinding(finding, 3)],
        steps=4,
        write_counts=[
            ("encoder.act", "relu_", "forward", 12),
            ("AdamW.step", "lerp_", "optimizer", 8),
        ],
    )


def test_terminal_summary_points_at_the_write() -> None:
    console = Console(width=100, record=True, color_system=None)
    TerminalReporter(console).render(build_report(sample_run()))
    text = console.export_text()
    assert "gradtrace train.py  failed (exit 1) · level full · 4 steps · 20 in-place writes" in text
    assert "in-place write broke backward" in text
    assert "seen 3×" in text
    assert "wrote: /work/model.py:42 in Block.forward() · module encoder.act · op relu_" in text
    assert "❱ 42     g.relu_()" in text
    assert "corrupted: float32[8×4] on cpu saved by SigmoidBackward0 in module encoder.gate" in text
    assert "version 0 → 1" in text
    assert "also wrote: model.py:42 (add_ in encoder.act)" in text
    assert "fix: Use the out-of-place op" in text
    assert "run directory: /runs/demo" in text


def test_json_document_shape() -> None:
    document = render_json(build_report(sample_run()))
    assert document["format"] == 1
    assert document["run"]["status"] == "failed"
    assert document["run"]["writes"] == 20
    [finding] = document["findings"]
    assert finding["kind"] == "inplace-write"
    assert finding["count"] == 3
    assert (finding["file"], finding["line"], finding["op"]) == ("/work/model.py", 42, "relu_")
    assert finding["saved_by"]["module"] == "encoder.gate"
    assert document["writes"][0] == {
        "owner": "encoder.act",
        "op": "relu_",
        "phase": "forward",
        "count": 12,
    }


def clipped_run() -> Run:
    """Two recorded steps of a run with --update-ratio that clips at max_norm 1 (and a
    ReLU sampled for dead units at step 0)."""
    steps = [
        StepGradStats(
            step=step,
            optimizer="AdamW.step",
            params=(
                ParamStat("fc.weight", "fc", 12, 0.6, 3.0, 0.0, 1, 0.03),
                ParamStat("fc.bias", "fc", 3, 0.8, 4.0, 0.0, 0, 0.04),
            ),
            missing=(),
            nonfinite_outputs=(),
            cut=(),
            new_sites=(),
            clips=(ClipCall(before, 1.0, 2.0),),
            dead_units=(("act", 2, 8),) if step == 0 else (),
        )
        for step, before in ((0, 5.0), (2, 0.9))
    ]
    return Run(
        path=Path("/runs/clipped"),
        meta={"status": "ok", "exit_code": 0, "argv": ["train.py"], "level": "full"},
        findings=[],
        steps=3,
        grad_steps=steps,
    )


def test_update_ratio_and_clipping_in_terminal_json_and_html() -> None:
    console = Console(width=100, record=True, color_system=None)
    TerminalReporter(console).render(build_report(clipped_run()))
    text = console.export_text()
    assert "‖Δp‖/‖p‖" in text
    assert re.search(r"│ \(global, before clip\) │\s+0\.9 │", text)
    assert re.search(r"│ \(global, after clip\)\s+│\s+1 │", text)
    assert re.search(r"│ fc\s+│\s+1 │\s+0\.2 │\s+0\.01 │", text)  # ‖Δp‖ 0.05 over ‖p‖ 5
    assert "clip_grad_norm_(max_norm=1) clipped on 1 of 2 recorded steps that called it" in text
    stats = render_json(build_report(clipped_run()))["grad_stats"]
    assert stats["global_grad_norm_before_clip"] == [[0, 5.0], [2, 0.9]]
    assert stats["global_grad_norm"] == [[0, 1.0], [2, 1.0]]
    assert stats["clip_max_norm"] == [[0, 1.0], [2, 1.0]]
    assert stats["modules"]["fc"]["update_ratio"] == [[0, 0.01], [2, 0.01]]
    assert stats["params"]["fc.bias"]["update_ratio"] == [[0, 0.01], [2, 0.01]]
    assert stats["dead_units"] == {"act": [[0, 0.25]]}
    page = render_html(build_report(clipped_run()))
    assert "Global gradient norm before clipping" in page
    assert "Clipped on 1 of 2 recorded steps" in page
    assert "Update ratio per module × step" in page
    plain = render_html(build_report(sample_run()))
    assert "before clipping" not in plain and "Update ratio" not in plain
    assert (
        render_json(build_report(sample_run()))["grad_stats"]["global_grad_norm_before_clip"] == []
    )


def long_names_run(norms: list[float] | None = None) -> Run:
    """Steps of a transformer-like run whose module paths outgrow an 80-column console."""
    modules = [f"model.encoder.layers.{i}.self_attention.out_projection" for i in range(3)]
    norms = norms or [0.5, 0.7, 0.6, 0.9]
    steps = [
        StepGradStats(
            step=step,
            optimizer="AdamW.step",
            params=tuple(
                ParamStat(f"{m}.weight", m, 64, norm * (i + 1), 4.0, 0.0, i, 0.01)
                for i, m in enumerate(modules)
            ),
            missing=(),
            nonfinite_outputs=(),
            cut=(),
            new_sites=(),
        )
        for step, norm in enumerate(norms)
    ]
    return Run(
        path=Path("/runs/long"),
        meta={"status": "ok", "exit_code": 0, "argv": ["train.py"], "level": "full"},
        findings=[],
        steps=len(norms),
        grad_steps=steps,
        write_counts=[(f"{modules[2]}.dropout_mask_owner", "mul_", "forward", 3)],
    )


def test_module_paths_at_80_columns_keep_their_end() -> None:
    console = Console(width=80, record=True, color_system=None)
    TerminalReporter(console).render(build_report(long_names_run()))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    # Each module is told apart by its layer index: it stays, and so do the numbers.
    for i in range(3):
        [row] = [r for r in text.splitlines() if f".{i}.s.out_projection │" in r]
        assert re.search(r"│\s+[\d.]+ │\s+[\d.]+ │\s+[\d.]+ │ [▁-█]{4}", row), row
    assert "│ m.e.l.2.s.out_projection.dropout_mask_owner " in text
    wide = Console(width=200, record=True, color_system=None)
    TerminalReporter(wide).render(build_report(long_names_run()))
    assert "│ model.encoder.layers.0.self_attention.out_projection │" in wide.export_text()


def test_shorten_path_keeps_the_end_in_the_width() -> None:
    path = "encoder.layers.1.linear1"
    assert shorten_path(path, 30) == path
    assert shorten_path(path, 18) == "e.layers.1.linear1"
    assert shorten_path(path, 13) == "e.l.1.linear1"
    assert shorten_path(path, 12) == "…l.1.linear1"
    assert shorten_path(path, 3) == "…r1"


def test_cut_left_counts_cells() -> None:
    assert cut_left("abc", 3) == "abc"
    assert cut_left("層層層層", 6) == "…層層"  # two cells each: 5 of the 6 used
    assert cut_left("abc", 0) == ""


FLAT = [0.249997, 0.25, 0.250001, 0.249999]
GLOBAL_NORM = "‖grad‖ (L2, all parameters)"


def test_a_flat_series_is_a_level_sparkline_not_noise_at_full_height() -> None:
    console = Console(width=120, record=True, color_system=None)
    TerminalReporter(console).render(build_report(long_names_run(FLAT)))
    rows = [line for line in console.export_text().splitlines() if "out_projection │" in line]
    assert len(rows) == 3
    assert {re.findall(r"[▁-█]+", row)[-1] for row in rows} == {"▅▅▅▅"}
    swinging = Console(width=120, record=True, color_system=None)
    TerminalReporter(swinging).render(build_report(long_names_run([0.2, 0.25, 0.3, 0.22])))
    assert "▁▅█▃" in swinging.export_text()  # log-scaled


def _chart(page: str, label: str) -> str:
    return re.search(rf"<svg class='chart'[^>]*aria-label='{re.escape(label)}'>.*?</svg>", page)[0]


def test_a_flat_norm_curve_is_level_between_axis_labels_that_differ() -> None:
    chart = _chart(render_html(build_report(long_names_run(FLAT))), GLOBAL_NORM)
    ys = {point.split(",")[1] for point in re.search(r"points='([^']*)'", chart)[1].split()}
    assert len(ys) == 1  # one level line
    top, bottom = re.findall(r"<text x='64' y='\d+' text-anchor='end'>([^<]*)</text>", chart)
    norm = 0.25 * math.sqrt(1 + 4 + 9)  # the global norm of the three modules
    assert top != bottom and float(bottom) < norm < float(top)
    close = _chart(
        render_html(build_report(long_names_run([0.25, 0.25, 0.25, 0.2503]))), GLOBAL_NORM
    )
    top, bottom = re.findall(r"<text x='64' y='\d+' text-anchor='end'>([^<]*)</text>", close)
    assert top != bottom  # 0.25 apart by 0.12 %: more digits, not "0.935" twice


def test_html_keeps_the_line_breaks_between_pytorchs_error_and_gradtraces_attribution() -> None:
    run = sample_run()
    message = (
        "one of the variables needed ... expected version 0 instead.\n\ngradtrace: model.py:42"
    )
    run.meta["exception"] = {"type": "RuntimeError", "message": message}
    page = render_html(build_report(run))
    raised = re.search(r"<p class='([^']*)'>RuntimeError: ([^<]*)</p>", page)
    assert raised[2].endswith("instead.\n\ngradtrace: model.py:42")
    css_class = raised[1].split()[-1]
    assert re.search(rf"\.{css_class}\b[^{{]*{{[^}}]*white-space: pre-wrap", page)


def test_step_labels_never_overlap_even_for_a_run_of_one_step() -> None:
    one_step = long_names_run([0.5])
    one_step.step_write_counts.append((0, "encoder.act", "relu_", "forward", 3))
    page = render_html(build_report(one_step))
    labels = re.findall(
        r"<text x='[\d.]+' y='\d+'( text-anchor='end')?>(steps? [^<]*)</text>", page
    )
    # The norm curve and the heat maps (norms, update ratios, writes): one label each.
    assert labels == [("", "step 0")] * 4
    many = render_html(build_report(long_names_run([0.1, 0.2, 0.3, 0.4])))
    labels = re.findall(r"<text x='([\d.]+)' y='\d+'( text-anchor='end')?>step (\d+)</text>", many)
    starts = [float(x) for x, end, _ in labels if not end]
    ends = [float(x) for x, end, _ in labels if end]
    assert starts and all(e - s >= 140 for s, e in zip(starts, ends, strict=True))
