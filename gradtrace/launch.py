"""`gradtrace run --nproc-per-node N`: torchrun's own launcher, with gradtrace inside each rank.

Delegates to `torch.distributed.run` (the module behind `torchrun`) on this node, standalone
rendezvous, so each rank is started, watched and torn down by torch's elastic agent exactly
as under `torchrun --standalone --nproc-per-node N -m gradtrace run ...`. The job directory is
chosen here, once, and handed to every rank with `--out`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def launch_ranks(nproc_per_node: int, job_dir: Path, rank_args: Sequence[str]) -> int:
    """Run `gradtrace run --out JOB_DIR RANK_ARGS` on N local ranks; the job's exit code.

    That is the exit code of the rank that failed first (128 + signal for a rank killed by
    a signal), or 0 when every rank succeeded.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    launcher_args = [
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        "-m",
        "gradtrace",
        "run",
        "--out",
        str(job_dir),
        "--no-summary",
        *rank_args,
    ]
    try:
        torchrun.run(torchrun.parse_args(launcher_args))
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        return _exit_status(failure.exitcode)
    except SignalException as error:
        return 128 + int(error.sigval)
    return 0


def _exit_status(code: int) -> int:
    """A shell's view of a child's status: negative means killed by that signal."""
    return 128 - code if code < 0 else code
