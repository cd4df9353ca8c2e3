"""Code typed into IPython is the user's code: findings name its lines.

IPython's terminal compiles a cell as "<ipython-input-N-HASH>" and keeps its lines in
linecache (Jupyter kernels use a file name in a temporary folder instead, see
test_notebook.py). A name in angle brackets is otherwise Python's own (`<string>`,
`<frozen ...>`), never a user line.
"""

from __future__ import annotations

import linecache
from pathlib import Path

import pytest
import torch
from cores import CORES

import gradtrace
from gradtrace.analysis.report import build_report
from gradtrace.session import Session
from gradtrace.store import load_run

CELL_NAME = "<ipython-input-3-0123456789ab>"
CELL = """\
class Gated(torch.nn.Module):
    def forward(self, x):
        gate = torch.sigmoid(x)
        return gate.relu_()


model = Gated()
"""


@pytest.mark.parametrize("core", CORES)
def test_a_cell_typed_into_ipython_is_named(core: str, tmp_path: Path) -> None:
    lines = CELL.splitlines(keepends=True)
    linecache.cache[CELL_NAME] = (len(CELL), None, lines, CELL_NAME)
    namespace = {"torch": torch}
    try:
        exec(compile(CELL, CELL_NAME, "exec"), namespace)
        session = Session(tmp_path / "run", core=core).start()
        try:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                namespace["model"](torch.randn(2, 3, requires_grad=True)).sum().backward()
        finally:
            session.close()
    finally:
        linecache.cache.pop(CELL_NAME, None)
    (finding,) = session.findings
    assert (finding.kind, finding.file, finding.line) == ("inplace-write", CELL_NAME, 4)
    assert finding.code == "return gate.relu_()"
    assert finding.context_start == 2
    assert finding.context[:3] == (
        "    def forward(self, x):",
        "        gate = torch.sigmoid(x)",
        "        return gate.relu_()",
    )
    assert finding.saved_by["line"] == 3
    assert finding.message.startswith(f"{CELL_NAME}:4 in Gated (relu_) overwrote")


IGNORING_CELL_NAME = "<ipython-input-4-0123456789ab>"
IGNORING_CELL = """\
def deliberate(x):
    h = torch.exp(x)
    with gradtrace.ignore("silent-overwrite"):
        h.data.mul_(0.5)
    return h.sum()
"""


@pytest.mark.parametrize("core", CORES)
def test_a_gradtrace_ignore_block_in_a_cell_silences_it(core: str, tmp_path: Path) -> None:
    lines = IGNORING_CELL.splitlines(keepends=True)
    linecache.cache[IGNORING_CELL_NAME] = (len(IGNORING_CELL), None, lines, IGNORING_CELL_NAME)
    namespace = {"torch": torch, "gradtrace": gradtrace}
    try:
        exec(compile(IGNORING_CELL, IGNORING_CELL_NAME, "exec"), namespace)
        with Session(tmp_path / "run", core=core) as session:
            namespace["deliberate"](torch.randn(8, requires_grad=True)).backward()
    finally:
        linecache.cache.pop(IGNORING_CELL_NAME, None)
    assert session.findings == []
    silenced = build_report(load_run(tmp_path / "run")).silenced
    assert [(s.stored.finding.file, s.stored.finding.line) for s in silenced] == [
        (IGNORING_CELL_NAME, 4)
    ]
