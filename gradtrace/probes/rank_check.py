"""`--check-ranks`: every rank's per-parameter norms, gathered once per recorded step.

The gradient-statistics probe hands over the norms it already computed on device; this probe
gathers them from every rank with a single `all_reduce` (each rank fills its own row of a
zero table, so the sum is the gather) on the user's default process group, and queues the
result on the deferred queue like every other device value. On NCCL the collective is
queued on the stream and the host never waits; on gloo it runs on the host, as the rest of
a gloo job does. Every rank must call it at the same optimizer steps, which DDP's lockstep
guarantees; without an initialised process group there is nothing to compare.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from gradtrace.events import RankNorms
from gradtrace.probes.deferred import DeferredQueue, stack_scalars
from gradtrace.probes.guard import ProbeGuard
from gradtrace.probes.own_ops import own_ops


class RankCheckProbe:
    def __init__(
        self,
        queue: DeferredQueue,
        on_norms: Callable[[RankNorms], None],
        *,
        guard: ProbeGuard | None = None,
    ) -> None:
        self._guard = guard or ProbeGuard("rank check")
        # Called by the gradient statistics probe: failures here are this probe's.
        self.compare = self._guard(self.compare)  # type: ignore[method-assign]
        self._queue = queue
        self._on_norms = on_norms
        # Why the check stopped (a backend that cannot reduce these tensors), once.
        self.disabled: str | None = None
        # Steps compared so far: zero at the end means there was no process group.
        self.compared = 0

    def compare(
        self,
        step: int,
        optimizer: str,
        params: list[str],
        grad_norms: list[torch.Tensor],
        param_norms: list[torch.Tensor],
    ) -> None:
        """Gather this rank's norms with every other rank's; stored once read (rank 0 only)."""
        from torch import distributed

        if self.disabled is not None or not params:
            return
        if not distributed.is_available() or not distributed.is_initialized():
            return
        rank, world = distributed.get_rank(), distributed.get_world_size()
        with own_ops():
            local = stack_scalars([*grad_norms, *param_norms])
            table = torch.zeros(world, local.numel(), dtype=local.dtype, device=local.device)
            table[rank] = local
            try:
                distributed.all_reduce(table)
            except RuntimeError as error:
                self.disabled = str(error).splitlines()[0]
                return
        self.compared += 1
        if rank == 0:
            store = functools.partial(self._store, step, optimizer, params)
            self._queue.push(table.flatten(), self._guard(store))

    def _store(self, step: int, optimizer: str, params: list[str], read: list[float]) -> None:
        n = len(params)
        rows = [read[i : i + 2 * n] for i in range(0, len(read), 2 * n)]
        self._on_norms(
            RankNorms(
                step=step,
                optimizer=optimizer,
                params=tuple(params),
                grad_norms=tuple(tuple(row[:n]) for row in rows),
                param_norms=tuple(tuple(row[n:]) for row in rows),
            )
        )
