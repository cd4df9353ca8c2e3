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
from gradtrace.analysis.report import Report, build_report
from gradtrace.api import print_summary
from gradtrace.errors import GradtraceError
from gradtrace.launch import launch_ranks
from gradtrace.options import RunOptions
from gradtrace.outputs import attach_outputs
from gradtrace.reporters.chrome_trace import TRACE_FILE, write_trace
from gradtrace.reporters.html import write_html
from gradtrace.reporters.json_report import render_json
from gradtrace.reporters.plain import Plain
from gradtrace.reporters.runs_table import find_runs, render_runs_table
from gradtrace.reporters.tensorboard import tensorboard_dir, write_tensorboard
from gradtrace.reporters.terminal import TerminalReporter
from gradtrace.runner import Target, run_target
from gradtrace.session import DEFAULT_RUNS_DIR, Session, default_run_dir
from gradtrace.store.reader import load_job, load_run


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
@RunOptions.click_options
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    help="Launch N ranks on this node through torch.distributed.run (torchrun), each traced; "
    "one report for all of them.",
)
@click.option(
    "--summary/--no-summary",
    default=True,
    show_default=True,
    help="Print the summary when the script ends.",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(
    module: str | None,
    out: Path | None,
    nproc_per_node: int | None,
    summary: bool,
    args: tuple[str, ...],
    **values: object,
) -> int:
    """Run SCRIPT [ARGS]... (or -m MODULE [ARGS]...) as python would, with tracing on."""
    if module is not None:
        target = Target(module, args, module=True)
    elif args:
        target = Target(args[0], args[1:])
    else:
        raise click.UsageError("Give a script to run (gradtrace run train.py [ARGS]...).")
    options = RunOptions.from_cli(values)
    target.check()
    run_dir = out or default_run_dir(Path(target.label).stem)
    if nproc_per_node is not None:
        exit_code = launch_ranks(nproc_per_node, run_dir, _rank_args(options, target))
        if summary:
            print_summary(run_dir)  # a job no rank got to record in keeps the ranks' exit code
        return exit_code
    session = Session(run_dir, options, argv=[target.name, *target.args])
    attach_outputs(session, tensorboard=options.tensorboard)
    if summary:
        session.after_close(functools.partial(_print_summary, session))
    return run_target(target, session)


def _rank_args(options: RunOptions, target: Target) -> list[str]:
    """This command's options and target as each rank's `gradtrace run` must get them."""
    where = ["-m", target.name] if target.module else [target.name]
    return [*options.to_argv(), *where, *target.args]


def _print_summary(session: Session, report: Report) -> None:
    """The run's summary; under torchrun rank 0's, and other ranks' only if they found something."""
    rank = session.rank
    if rank is not None and rank.rank != 0 and not session.findings:
        return
    print_summary(session.run_dir, report)
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
    report = build_report(load_job(run_dirs))
    if html_out is not None:
        written = write_html(report, html_out)
        click.echo(f"HTML report in {written}", err=as_json)
        if not as_json:
            return 0
    if as_json:
        click.echo(json.dumps(render_json(report), indent=2))
    else:
        TerminalReporter(Console()).render(report)
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
    report = build_report(load_run(run_dir))
    target = tensorboard_dir(run_dir, logdir)
    written = write_tensorboard(report, target if logdir is not None else _in_run(target))
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
    report = build_report(load_run(run_dir))
    written = write_trace(report, out if out is not None else _in_run(run_dir / TRACE_FILE))
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
