"""Measure how `report`, `report --json`, `report --html` and `ls` grow with a job's ranks.

Builds synthetic torchrun job directories (8, 16, 32, 64 ranks by default; 8 ranks per node)
as the run writer stores them: one rank's run of `--steps` recorded steps of `--params`
parameters with per-step write counts and one in-place finding, copied to every rank with
its own rank, node and host in meta. Then times, per rank count, each command in its own
process (what a user waits for, the interpreter's start and imports included) and, in
process, the phases the commands share: reading the job (`load_job`), its findings
(`build_report`) and each reporter. Every timing is the median of `--repeat` runs.

    python scripts/bench_ranks.py                      # 8/16/32/64 ranks, ~2 min on 2 cores
    python scripts/bench_ranks.py --ranks 64 --steps 1000 --json ranks.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from gradtrace.analysis.report import Report, build_report
from gradtrace.events import FORWARD, OPTIMIZER, Finding, ParamStat, StepGradStats
from gradtrace.reporters.html import write_html
from gradtrace.reporters.json_report import render_json
from gradtrace.reporters.runs_table import find_runs, render_runs_table
from gradtrace.reporters.terminal import TerminalReporter
from gradtrace.store.format import FINDINGS_AT_CLOSE, OK, rank_run_dir
from gradtrace.store.reader import load_job
from gradtrace.store.writer import RunWriter, add_meta

RANKS_PER_NODE = 8


def build_rank(run_dir: Path, *, steps: int, params: int) -> None:
    """One rank's run: `steps` recorded steps, `params` parameters, writes, one finding."""
    writer = RunWriter(run_dir)
    writer.set_meta(
        status=OK,
        exit_code=0,
        argv=["train.py"],
        level="full",
        core="native",
        every=1,
        started_ns=time.time_ns(),
    )
    layers = max(1, params // 2)
    for step in range(steps):
        stats = tuple(
            ParamStat(
                name=f"layers.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}",
                module=f"layers.{i // 2}",
                numel=4096 if i % 2 == 0 else 64,
                grad_norm=0.1 + 0.01 * math.sin(step + i),
                param_norm=math.nan if step % 10 else 3.0 + 0.001 * step,
                zero_fraction=math.nan if step % 10 else 0.0,
                arrival=params - 1 - i,
            )
            for i in range(params)
        )
        writer.write_grad_stats(StepGradStats(step, "AdamW.step", stats, (), (), (), ()))
        counts = [((f"layers.{i}.act", "relu_", FORWARD), 1) for i in range(layers)]
        counts += [(("AdamW.step", op, OPTIMIZER), params) for op in ("mul_", "add_", "lerp_")]
        writer.write_step(step, counts, finished=True)
    writer.add_finding(
        Finding(
            kind="inplace-write",
            message="train.py:42 in layers.3.act (relu_) overwrote the tensor that "
            "layers.3 (sigmoid) saved for backward.",
            hint="Use the out-of-place op.",
            step=0,
            phase=FORWARD,
            op="relu_",
            module="layers.3.act",
            saved_by={},
            file="/work/train.py",
            line=42,
            function="Block.forward",
            code="h.relu_()",
        )
    )
    writer.set_meta(ended_ns=time.time_ns(), **{FINDINGS_AT_CLOSE: 1})
    writer.close()


def build_job(job_dir: Path, ranks: int, template: Path) -> None:
    """A job of `ranks` copies of `template`, each with its own rank, node and host."""
    for rank in range(ranks):
        run_dir = rank_run_dir(job_dir, rank)
        shutil.copytree(template, run_dir)
        node = rank // RANKS_PER_NODE
        add_meta(
            run_dir,
            rank=rank,
            world_size=ranks,
            local_rank=rank % RANKS_PER_NODE,
            node_rank=node,
            host=f"node-{node}",
        )


def median_s(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cli_s(args: list[str], repeat: int) -> float:
    command = [sys.executable, "-m", "gradtrace", *args]
    return median_s(
        lambda: subprocess.run(command, check=True, capture_output=True, timeout=600), repeat
    )


def measure(job_dir: Path, scratch: Path, repeat: int) -> dict[str, float]:
    html = scratch / "report.html"

    def report() -> Report:
        return build_report(load_job([job_dir]))

    def terminal() -> None:
        TerminalReporter(Console(file=io.StringIO(), width=100)).render(report())

    return {
        "load_job": median_s(lambda: load_job([job_dir]), repeat),
        "build_report": median_s(report, repeat),
        "terminal": median_s(terminal, repeat),
        "json": median_s(lambda: json.dumps(render_json(report())), repeat),
        "html": median_s(lambda: write_html(report(), html), repeat),
        "ls": median_s(
            lambda: render_runs_table(find_runs(job_dir.parent), job_dir.parent), repeat
        ),
        "cli report": cli_s(["report", str(job_dir)], repeat),
        "cli report --json": cli_s(["report", "--json", str(job_dir)], repeat),
        "cli report --html": cli_s(["report", str(job_dir), "--html", str(html)], repeat),
        "cli ls": cli_s(["ls", str(job_dir.parent)], repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="8,16,32,64", help="comma-separated rank counts")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--params", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    options = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="gradtrace-bench-ranks-") as scratch:
        root = Path(scratch)
        template = root / "template"
        build_rank(template, steps=options.steps, params=options.params)
        header = None
        for ranks in (int(n) for n in options.ranks.split(",")):
            job_dir = root / f"jobs-{ranks}" / "job"
            build_job(job_dir, ranks, template)
            row = measure(job_dir, root, options.repeat)
            results[ranks] = row
            if header is None:
                header = "ranks | " + " | ".join(row)
                print(header)
            print(f"{ranks:5d} | " + " | ".join(f"{seconds:.2f}" for seconds in row.values()))
            shutil.rmtree(job_dir.parent)
    if options.json is not None:
        options.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
