"""What a notebook shows: the HTML report inline, through IPython's display protocol.

The report is `gradtrace report --html`'s document: findings with the code excerpt and the
writing line marked, the fix, the gradient-norm pictures. That document styles `body`, `h2`,
`table` and more; pasted into a notebook's page it would restyle the notebook itself. So it
goes into an iframe's `srcdoc`: its styles and its hover script stay inside, and nothing has
to be installed (no widget extension) for JupyterLab, classic Jupyter or VS Code to show it.
Pure: runs and findings in, strings out.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from gradtrace.analysis.report import build_report
from gradtrace.events import Finding
from gradtrace.reporters.html import render_findings, render_html
from gradtrace.store.reader import Run, StoredFinding

# Height of the frame until its content is measured (the frame's onload sets the real one);
# where a front end runs no script (an untrusted notebook) the frame scrolls.
INITIAL_HEIGHT_PX = 640


def report_document(run: Run | None, findings: Sequence[StoredFinding] = ()) -> str:
    """The one place that calls the HTML reporter: `run`'s whole report, or, without a run,
    a document of `findings` alone."""
    return render_findings(findings) if run is None else render_html(build_report(run))


def inline_html(document: str) -> str:
    """`document` as an HTML fragment a notebook output can hold: an iframe sized to it."""
    fit = "this.style.height=(this.contentDocument.documentElement.scrollHeight+4)+'px'"
    return (
        f'<iframe class="gradtrace-report" srcdoc="{escape(document, quote=True)}" '
        f'style="width:100%;height:{INITIAL_HEIGHT_PX}px;border:0" onload="{fit}"></iframe>'
    )


def run_html(run: Run) -> str:
    """A run's report, for `_repr_html_`."""
    return inline_html(report_document(run))


class Findings(list[Finding]):
    """A list of findings that a notebook shows as the report's finding cards.

    Still a plain list for everything else (`assert not tr.findings`, indexing, equality).
    """

    def _repr_html_(self) -> str:
        stored = [StoredFinding(finding, 1) for finding in self]
        return inline_html(report_document(None, stored))
