"""Reporters on hand-built runs, at a fixed console width."""

from __future__ import annotations

from pathlib import Path

from events_factory import evidence, write
from rich.console import Console

from gradtrace.analysis.culprits import diagnose
from gradtrace.reporters.json_report import render_json
from gradtrace.reporters.terminal import TerminalReporter
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
    TerminalReporter(console).render(sample_run())
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
    document = render_json(sample_run())
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
