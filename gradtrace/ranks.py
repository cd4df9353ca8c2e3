"""Where one rank of a torchrun job records: its own directory inside the job's run directory.

torchrun gives every rank RANK, WORLD_SIZE and LOCAL_RANK in its environment. Each rank
writes a complete run of its own to `RUN_DIR/rank-<RANK>` (no two processes ever share a
database), and `load_run(RUN_DIR)` merges them. Ranks started without `--out` must still
agree on RUN_DIR although their clocks tick apart: rank 0 names it and publishes the name
through the key-value store torchrun's agent already runs for the job (MASTER_ADDR and
MASTER_PORT, when torchrun sets TORCHELASTIC_USE_AGENT_STORE=True), which is what
`init_process_group` itself connects to. Other launchers need `--out`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from gradtrace.errors import GradtraceError
from gradtrace.store.format import rank_run_dir

# How long a rank waits for rank 0 to publish the run directory.
AGREE_TIMEOUT = timedelta(seconds=120)


@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    # The node (torchrun's agent, GROUP_RANK) this rank runs on: 0 on a single node.
    node_rank: int = 0

    def run_dir(self, job_dir: Path) -> Path:
        return rank_run_dir(job_dir, self.rank)


def current_rank(environ: Mapping[str, str] = os.environ) -> Rank | None:
    """The rank torchrun (or any launcher setting RANK and WORLD_SIZE) gave us; None alone."""
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        rank = int(environ["RANK"])
        world_size = int(environ["WORLD_SIZE"])
        local_rank = int(environ.get("LOCAL_RANK", rank))
        node_rank = int(environ.get("GROUP_RANK", 0))
    except ValueError:
        raise GradtraceError(
            f"RANK={environ['RANK']!r}, WORLD_SIZE={environ['WORLD_SIZE']!r}, LOCAL_RANK="
            f"{environ.get('LOCAL_RANK')!r} or GROUP_RANK={environ.get('GROUP_RANK')!r} in the "
            "environment are not integers; launch with torchrun or unset them."
        ) from None
    if not 0 <= rank < world_size:
        raise GradtraceError(
            f"RANK={rank} is outside WORLD_SIZE={world_size}; launch with torchrun or unset them."
        )
    return Rank(rank, world_size, local_rank, node_rank)


def agree_on_job_dir(proposed: Path, rank: Rank, environ: Mapping[str, str] = os.environ) -> Path:
    """Rank 0's `proposed` job directory, the same on every rank of this torchrun job."""
    from torch.distributed import TCPStore

    host, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    # torchrun says whether its agent serves a store there; otherwise nothing would answer
    # and every rank would wait AGREE_TIMEOUT for nothing (torch's rendezvous asks the same).
    agent_store = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if not agent_store or not host or not port or not port.isdigit():
        raise GradtraceError(
            "This rank has no torchrun agent store (MASTER_ADDR/MASTER_PORT) to agree on a "
            "run directory with the other ranks; pass the same --out to every rank."
        )
    key = f"gradtrace/run_dir/{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        store = TCPStore(host, int(port), is_master=False, timeout=AGREE_TIMEOUT)
        if rank.rank == 0:
            store.set(key, str(proposed))
        return Path(store.get(key).decode())
    except RuntimeError as error:
        raise GradtraceError(
            f"Could not agree on a run directory with the other ranks through "
            f"{host}:{port} ({str(error).splitlines()[0]}); pass the same --out to every rank."
        ) from None
