"""The Jupyter front end in a real kernel: `%load_ext gradtrace`, `%%gradtrace`, HTML output.

A notebook is built with nbformat and executed by nbclient on an ipykernel kernel (the
`notebook` extra; the `test` extra installs it), as JupyterLab or VS Code would run it.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
nbconvert = pytest.importorskip("nbconvert")
pytest.importorskip("ipykernel")

import torch  # noqa: E402
from chromium import chromium_command, needs_chromium  # noqa: E402
from events_factory import evidence, write  # noqa: E402

import gradtrace  # noqa: E402
from gradtrace.analysis.culprits import diagnose  # noqa: E402
from gradtrace.reporters.notebook import Findings  # noqa: E402

MODEL_CELL = """\
import torch
from torch import nn


class GatedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        gate = torch.sigmoid(self.gate(x))
        return self.act(gate)


torch.manual_seed(0)
buggy = GatedBlock()
healthy = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
optimizer = torch.optim.SGD(healthy.parameters(), lr=0.1)
"""

HEALTHY_CELL = """\
%%gradtrace --level light --out {out}
for _ in range(3):
    loss = healthy(torch.randn(4, 8)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
round(12.3456, 2)
"""

BUGGY_CELL = """\
%%gradtrace --out {out}
buggy(torch.randn(4, 8)).sum().backward()
"""

SRCDOC = re.compile(r'srcdoc="([^"]*)"')


# A WGAN critic clipped through `.data`: training runs, the gradients are silently wrong.
CRITIC_CELL = """\
import torch
from torch import nn

torch.manual_seed(11)
critic = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.RMSprop(critic.parameters(), lr=5e-4)
"""

CRITIC_TRAINING = """\
%%gradtrace --out {out}
for step in range(20):
    real, fake = torch.randn(32, 2) + 1.0, torch.randn(32, 2)
    loss = critic(fake).mean() - critic(real).mean()
    optimizer.zero_grad()
    for param in critic.parameters():
        param.data.clamp_(-0.05, 0.05)  # weight clipping
    loss.backward()
    optimizer.step()
"""


def run_notebook(cells: list[str], cwd: Path) -> list[dict[str, Any]]:
    """Execute `cells` in a fresh kernel; errors are kept as outputs, as a notebook shows them."""
    return [cell["outputs"] for cell in executed(cells, cwd).cells]


def executed(cells: list[str], cwd: Path) -> Any:
    """A notebook of `cells`, executed in a fresh kernel (errors kept as outputs)."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()
    return notebook


def report_in(output: dict[str, Any]) -> str:
    """The HTML document a display output holds in its iframe."""
    assert output["output_type"] in ("display_data", "execute_result"), output
    return document_in(output["data"]["text/html"])


def test_cell_magic_in_a_real_kernel(tmp_path: Path) -> None:
    healthy_dir, buggy_dir = tmp_path / "healthy", tmp_path / "buggy"
    outputs = run_notebook(
        [
            "%load_ext gradtrace",
            MODEL_CELL,
            HEALTHY_CELL.format(out=healthy_dir),
            BUGGY_CELL.format(out=buggy_dir),
            "finding = _gradtrace.findings[0]\nprint(finding.code, finding.file, finding.line)",
            f"import gradtrace\ngradtrace.load_run({str(buggy_dir)!r})",
            "print(healthy(torch.ones(1, 8)).shape)",
        ],
        tmp_path,
    )
    load, model, healthy, buggy, findings, loaded, after = outputs
    assert load == [] and model == []

    # A healthy cell: the report (no findings, the gradient-norm picture), then its value.
    report, value = healthy
    document = report_in(report)
    assert "No findings." in document
    assert "<h2>Global gradient norm</h2><svg" in document
    assert "3 steps" in document
    assert value["output_type"] == "execute_result"
    assert value["data"]["text/plain"] == "12.35"
    meta = gradtrace.load_run(healthy_dir).meta
    assert (meta["level"], meta["front_end"]) == ("light", "notebook")
    assert meta["argv"] == ["%%gradtrace", "--level", "light", "--out", str(healthy_dir)]

    # A buggy cell: the report first, the writing line marked, then PyTorch's own error.
    report, error = buggy
    document = report_in(report)
    assert "<h3>in-place write broke backward</h3>" in document
    hit = re.search(r"<span class='hit'>([^<]*)</span>", document)
    assert hit is not None and "return self.act(gate)" in html.unescape(hit.group(1))
    assert "<b>fix:</b> Use the out-of-place op (relu instead of relu_" in document
    assert error["output_type"] == "error" and error["ename"] == "RuntimeError"
    assert "modified by an inplace operation" in error["evalue"]
    traceback = "\n".join(error["traceback"])
    assert "self.act(gate)" in traceback
    assert "gradtrace/notebook.py" not in traceback  # the magic's own frames are hidden

    # The cell's trace and the loaded run: the same finding, the run shown as its report.
    # Named as IPython names the cell (its code lives in a kernel's temporary file).
    assert findings[0]["text"] == "return self.act(gate) Cell In[2] 13\n"
    assert "Cell In[2]:13" in document
    document = report_in(loaded[0])
    assert "<h3>in-place write broke backward</h3>" in document
    assert loaded[0]["data"]["text/plain"].startswith(f"<gradtrace.Run '{buggy_dir}' failed")

    # The kernel goes on: the model lives on, untraced.
    assert after[0]["text"] == "torch.Size([1, 1])\n"


def test_bad_magic_options_are_one_line(tmp_path: Path) -> None:
    cells = [
        "%load_ext gradtrace",
        "%%gradtrace --level heavy\nx = 1",
        "print(x)",
        "import gradtrace\ntr = gradtrace.start(out='outer')",
        "%%gradtrace\ny = 1",
        "tr.stop()\nprint(y)",
    ]
    _, (usage,), (after,), _, (busy,), (after_busy,) = run_notebook(cells, tmp_path)
    # IPython shows a UsageError as one line on stderr, without a traceback.
    assert usage["name"] == "stderr"
    assert usage["text"].strip() == (
        "UsageError: %%gradtrace: argument --level: invalid choice: 'heavy' "
        "(choose from 'light', 'full')."
    )
    assert after["ename"] == "NameError"  # the cell did not run
    # Another trace runs: one line naming it, and the cell does not run.
    assert busy["name"] == "stderr"
    assert busy["text"].strip() == (
        "UsageError: %%gradtrace: A gradtrace session is already tracing into 'outer'; "
        "stop it before starting another."
    )
    assert after_busy["ename"] == "NameError"
    assert not (tmp_path / "gradtrace-runs").exists()


def test_findings_and_runs_render_as_html(tmp_path: Path) -> None:
    """`_repr_html_` outside a kernel: the report's cards in a frame, stored text escaped."""
    from torch import nn

    model = nn.Sequential(nn.Linear(2, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.trace(model, out=tmp_path / "run") as tr:
        for _ in range(2):
            model(torch.ones(1, 2)).sum().backward()
            optimizer.step()
    assert isinstance(tr.findings, Findings) and tr.findings == []
    document = document_in(tr._repr_html_())
    assert "<h2>Findings</h2><p class='ok'>No findings.</p>" in document
    assert str(tmp_path / "run") in document
    # Summing a linear layer's output on ones: every weight and bias gradient is 1.
    assert {name: [step for step, _ in series] for name, series in tr.grad_norms.items()} == {
        "0": [0, 1]
    }
    assert tr.grad_norms["0"][0][1] == pytest.approx(math.hypot(2.0, math.sqrt(2.0)))

    hostile = "x = '</iframe><script>alert(1)</script>'"
    finding = diagnose(evidence((write("relu_"),)))
    finding = dataclasses.replace(finding, context=(hostile,), context_start=finding.line)
    frame = Findings([finding])._repr_html_()
    assert "<script>alert" not in frame and "</iframe><" not in frame[:-9]
    document = document_in(frame)
    assert "<h3>in-place write broke backward</h3>" in document
    assert html.escape(hostile) in document and hostile not in document


def document_in(fragment: str) -> str:
    match = SRCDOC.search(fragment)
    assert fragment.startswith("<iframe") and match is not None
    return html.unescape(match.group(1))


@needs_chromium
def test_exported_notebook_in_headless_chromium(tmp_path: Path) -> None:
    """The executed notebook, exported by nbconvert, in a real browser: the report's frame
    is sized to its content, and the screenshot shows it (docs/img/notebook.png)."""
    cells = ["%load_ext gradtrace", CRITIC_CELL, CRITIC_TRAINING.format(out="runs/critic")]
    notebook = executed(cells, tmp_path)
    report = notebook.cells[2]["outputs"][0]
    assert "silent overwrite: wrong gradients, no error" in report_in(report)
    assert gradtrace.load_run(tmp_path / "runs" / "critic").steps == 20  # the kernel's cwd
    page = tmp_path / "notebook.html"
    body, _ = nbconvert.HTMLExporter().from_notebook_node(notebook)
    page.write_text(body, encoding="utf-8")

    dom = subprocess.run(
        chromium_command(page, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout
    frames = re.findall(r'<iframe class="gradtrace-report"[^>]*style="([^"]*)"', dom)
    assert len(frames) == 1, dom[-2000:]
    height = re.search(r"height:\s*(\d+)px", frames[0])
    assert height is not None and int(height.group(1)) > 1000, frames[0]  # resized to fit

    screenshot = tmp_path / "notebook.png"
    subprocess.run(
        chromium_command(
            page,
            tmp_path / "profile",
            "--virtual-time-budget=5000",
            "--hide-scrollbars",
            f"--screenshot={screenshot}",
            "--window-size=1100,1500",
        ),
        capture_output=True,
        timeout=120,
        check=False,
    )
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000  # not a blank page
    keep = os.environ.get("GRADTRACE_KEEP_NOTEBOOK_SCREENSHOT")
    if keep:
        shutil.copy(screenshot, keep)
