"""`gradtrace` command line: run a script under tracing, report on a saved run."""

from __future__ import annotations

import functools
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import click
import torch
from rich.console import Console

from gradtrace import _native
from gradtrace.api import print_summary
from gradtrace.errors import GradtraceError
from gradtrace.launch import launch_ranks
from gradtrace.probes.timeline import DEFAULT_TRACE_STEPS, TraceSteps
from gradtrace.reporters.chrome_trace import TRACE_FILE, write_trace
from gradtrace.reporters.html import write_html
from gradtrace.reporters.json_report import render_json
from gradtrace.reporters.plain import Plain
from gradtrace.reporters.runs_table import find_runs, render_runs_table
from gradtrace.reporters.tensorboard import tensorboard_dir, write_tensorboard
from gradtrace.reporters.terminal import TerminalReporter
from gradtrace.runner import Target, run_target
from gradtrace.session import DEFAULT_LEVEL, DEFAULT_RUNS_DIR, LEVELS, Session, default_run_dir
from gradtrace.store.reader import Run, StoredFinding, load_job, load_run


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gradtrace")
def cli() -> None:
    """Find the in-place write that broke backward, and where gradients go wrong."""


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("-m", "module", metavar="MODULE", help="Run a module, like python -m.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help=f"Run directory to create (default: ./{DEFAULT_RUNS_DIR}/<time>-<script>).",
)
@click.option(
    "--level",
    type=click.Choice(LEVELS),
    default=DEFAULT_LEVEL,
    show_default=True,
    help="light: check saved tensors only; full: also log writes to name the culprit line.",
)
@click.option(
    "--every",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Record gradient statistics every N optimizer steps.",
)
@click.option(
    "--update-ratio",
    is_flag=True,
    help="Also record ‖Δp‖/‖p‖ per parameter; costs a device copy of the stepped parameters "
    "during each recorded optimizer.step().",
)
@click.option(
    "--grad-histograms",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="Also count every gradient's values into fixed bins every N optimizer steps "
    "(TensorBoard histograms grad_values/...); 0: never.",
)
@click.option(
    "--trace-steps",
    default=DEFAULT_TRACE_STEPS,
    show_default=True,
    metavar="STEPS",
    help="Optimizer steps whose module spans and in-place writes go into trace.json: "
    "steps and ranges such as 0-2,10, or none.",
)
@click.option(
    "--tensorboard",
    "tensorboard",
    is_flag=True,
    help="Write TensorBoard events while training, into RUN_DIR/tensorboard.",
)
@click.option(
    "--tensorboard-logdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write TensorBoard events while training into this logdir, as the sub-run "
    "gradtrace/<run name> (implies --tensorboard).",
)
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    help="Launch N ranks on this node through torch.distributed.run (torchrun), each traced; "
    "one report for all of them.",
)
@click.option(
    "--check-ranks",
    is_flag=True,
    help="Distributed: compare every parameter's gradient and value norms across ranks at "
    "each recorded step (one small all_reduce per recorded step).",
)
@click.option(
    "--summary/--no-summary",
    default=True,
    show_default=True,
    help="Print the summary when the script ends.",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(
    context: click.Context,
    module: str | None,
    out: Path | None,
    level: str,
    every: int,
    update_ratio: bool,
    grad_histograms: int,
    trace_steps: str,
    tensorboard: bool,
    tensorboard_logdir: Path | None,
    nproc_per_node: int | None,
    check_ranks: bool,
    summary: bool,
    args: tuple[str, ...],
) -> int:
    """Run SCRIPT [ARGS]... (or -m MODULE [ARGS]...) as python would, with tracing on."""
    if module is not None:
        target = Target(module, args, module=True)
    elif args:
        target = Target(args[0], args[1:])
    else:
        raise click.UsageError("Give a script to run (gradtrace run train.py [ARGS]...).")
    steps = TraceSteps.parse(trace_steps)
    target.check()
    run_dir = out or default_run_dir(Path(target.label).stem)
    if nproc_per_node is not None:
        exit_code = launch_ranks(nproc_per_node, run_dir, _rank_args(context, target))
        if summary:
            print_summary(run_dir)  # a job no rank got to record in keeps the ranks' exit code
        return exit_code
    live: bool | Path = tensorboard_logdir or tensorboard
    session = Session(
        run_dir,
        level=level,
        every=every,
        update_ratio=update_ratio,
        grad_histograms=grad_histograms,
        trace_steps=steps,
        tensorboard=live,
        check_ranks=check_ranks,
        argv=[target.name, *target.args],
    )
    if summary:
        session.after_close(functools.partial(_print_summary, session))
    return run_target(target, session)


def _rank_args(context: click.Context, target: Target) -> list[str]:
    """This command's options and target as each rank's `gradtrace run` must get them."""
    forwarded = ["--level", context.params["level"], "--every", str(context.params["every"])]
    if context.params["update_ratio"]:
        forwarded.append("--update-ratio")
    forwarded += ["--trace-steps", context.params["trace_steps"]]
    forwarded += ["--grad-histograms", str(context.params["grad_histograms"])]
    if context.params["tensorboard"]:
        forwarded.append("--tensorboard")
    if context.params["tensorboard_logdir"] is not None:
        forwarded += ["--tensorboard-logdir", str(context.params["tensorboard_logdir"])]
    if context.params["check_ranks"]:
        forwarded.append("--check-ranks")
    if target.module:
        forwarded += ["-m", target.name]
    else:
        forwarded.append(target.name)
    return [*forwarded, *target.args]


def _print_summary(session: Session, run: Run, findings: list[StoredFinding]) -> None:
    """The run's summary; under torchrun rank 0's, and other ranks' only if they found something."""
    rank = session.rank
    if rank is not None and rank.rank != 0 and not session.findings:
        return
    print_summary(session.run_dir, run, findings)
    if rank is not None:
        Console(stderr=True).print(
            f"Rank {rank.rank} of {rank.world_size}. All ranks: "
            f"[bold]gradtrace report {session.job_dir}[/]"
        )


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the stable JSON document.")
@click.option(
    "--html",
    "html_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a self-contained HTML report (heat map, curves, findings) to this file.",
)
def report(run_dirs: tuple[Path, ...], as_json: bool, html_out: Path | None) -> int:
    """Show the summary of a saved run (post-mortem, from the run directory alone).

    Several directories: one torchrun job recorded per node (RUN_DIRS of its nodes).
    """
    run = load_job(run_dirs)
    if html_out is not None:
        written = write_html(run, html_out)
        click.echo(f"HTML report in {written}", err=as_json)
        if not as_json:
            return 0
    if as_json:
        click.echo(json.dumps(render_json(run), indent=2))
    else:
        TerminalReporter(Console()).render(run)
    return 0


@cli.command(name="ls")
@click.argument("directory", type=click.Path(path_type=Path), required=False)
def ls_command(directory: Path | None) -> int:
    """List the runs in DIRECTORY (default ./gradtrace-runs): status, steps, findings."""
    console = Console()
    if directory is None:
        directory = Path(DEFAULT_RUNS_DIR)
        if not directory.exists():
            console.print(f"No gradtrace runs in './{directory}' (it does not exist yet).")
            return 0
    entries = find_runs(directory)
    if not entries:
        console.print(f"No gradtrace runs in '{directory}'.")
        return 0
    console.print(Plain(render_runs_table(entries, directory)))
    return 0


@cli.command(name="tensorboard")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--logdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write into this TensorBoard logdir as the sub-run gradtrace/<run name> "
    "(default: RUN_DIR/tensorboard).",
)
def tensorboard_command(run_dir: Path, logdir: Path | None) -> int:
    """Regenerate a run's TensorBoard events from the run directory alone."""
    run = load_run(run_dir)
    target = tensorboard_dir(run_dir, logdir)
    written = write_tensorboard(run, target if logdir is not None else _in_run(target))
    click.echo(f"TensorBoard events in {written}")
    click.echo(f"  view: tensorboard --logdir {logdir if logdir is not None else written}")
    return 0


@cli.command(name="trace")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Trace file to write (default: RUN_DIR/{TRACE_FILE}).",
)
def trace_command(run_dir: Path, out: Path | None) -> int:
    """Write a Chrome trace (steps, module spans, in-place writes, findings) for ui.perfetto.dev."""
    run = load_run(run_dir)
    written = write_trace(run, out if out is not None else _in_run(run_dir / TRACE_FILE))
    click.echo(f"Chrome trace in {written} (open it in https://ui.perfetto.dev)")
    return 0


def _in_run(path: Path) -> Path:
    """`path`, a default output inside a run directory, unless it is a link there.

    A run directory may come from someone else: a `trace.json` or `tensorboard` in it that
    links elsewhere would make gradtrace overwrite (or delete files in) the link's target.
    """
    linked = path.is_symlink() or (path.is_file() and path.stat().st_nlink > 1)
    if linked:
        raise GradtraceError(
            f"'{path}' is a link; gradtrace does not write through links in a run directory. "
            "Remove it, or write elsewhere with --out/--logdir."
        )
    return path


@cli.command(name="info")
def info_command() -> int:
    """Say which core traces (native or Python), why, and the versions it was built for."""
    status = _native.status()
    click.echo(f"core: {status.name} ({status.reason})")
    click.echo(f"torch: {torch.__version__}")
    click.echo(f"python: {platform.python_version()}")
    click.echo(f"native cache: {status.build_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code instead of exiting (tests call this)."""
    try:
        result = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="gradtrace",
            standalone_mode=False,
        )
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except GradtraceError as exc:
        click.echo(f"gradtrace: error: {exc}", err=True)
        return exc.exit_code
    return result if isinstance(result, int) else 0


def entry_point() -> None:
    sys.exit(main())
