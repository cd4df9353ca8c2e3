"""Gradient value histograms every N optimizer steps (`--grad-histograms N`), counted on device.

Bins are `HISTOGRAM_EDGES`, fixed for every parameter and step, so the counts need no
min/max first (reading those would synchronise) and histograms of different steps line
up. Each gradient is counted in chunks of
CHUNK_ELEMENTS: `bucketize` makes an int64 index per element, and chunking bounds that
temporary to a few MiB whatever the parameter's size (a non-contiguous gradient is read one
slice along dim 0 at a time). The counts are read one step late
through the deferred queue like every other device value.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch

from gradtrace.events import HISTOGRAM_EDGES as EDGES
from gradtrace.events import GradHistogram
from gradtrace.probes.deferred import DeferredQueue
from gradtrace.probes.guard import ProbeGuard
from gradtrace.probes.own_ops import own_ops

CHUNK_ELEMENTS = 1 << 20


class GradHistogramProbe:
    def __init__(
        self,
        every: int,
        queue: DeferredQueue,
        on_histograms: Callable[[list[GradHistogram]], None],
        *,
        guard: ProbeGuard | None = None,
    ) -> None:
        self._guard = guard or ProbeGuard("gradient histograms")
        # Called by the gradient statistics probe: failures here are this probe's.
        self.count = self._guard(self.count)  # type: ignore[method-assign]
        self._every = every
        self._queue = queue
        self._on_histograms = on_histograms
        # Per device: the bin edges, and the ones scatter_add_ counts with (one chunk long).
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def due(self, step: int) -> bool:
        return step % self._every == 0

    def count(self, step: int, names: list[str], grads: list[torch.Tensor]) -> None:
        """Queue the histograms of these gradients (names in the same order)."""
        if not grads:
            return
        device = grads[0].device
        with own_ops(*grads):
            table = torch.zeros(len(grads), len(EDGES) + 1, dtype=torch.int64, device=device)
            for row, grad in zip(table, grads, strict=True):
                self._count_into(row, grad.to(device, non_blocking=True))
        self._queue.push(table.flatten(), self._guard(functools.partial(self._read, step, names)))

    def _count_into(self, row: torch.Tensor, grad: torch.Tensor) -> None:
        constants = self._constants.get(row.device)
        if constants is None:
            edges = torch.tensor(EDGES, device=row.device)
            ones = torch.ones(CHUNK_ELEMENTS, dtype=torch.int64, device=row.device)
            constants = self._constants[row.device] = (edges, ones)
        edges, ones = constants
        for chunk in _flat_chunks(grad.detach()):
            # float32: fp16 cannot hold the smallest edges (bf16 could, but rounds them).
            # Complex values are counted by magnitude (casting them would drop the imaginary
            # part, with a warning to the user).
            # Contiguous: bucketize would copy a strided chunk anyway, and warn the user.
            values = chunk.abs() if chunk.is_complex() else chunk
            index = torch.bucketize(values.float().contiguous(), edges, right=True)
            row.scatter_add_(0, index, ones[: index.numel()])

    def _read(self, step: int, names: list[str], read: list[float]) -> None:
        width = len(EDGES) + 1
        self._on_histograms(
            [
                GradHistogram(step, name, tuple(int(c) for c in read[i * width : (i + 1) * width]))
                for i, name in enumerate(names)
            ]
        )


def _flat_chunks(grad: torch.Tensor) -> Iterator[torch.Tensor]:
    """The gradient's values in 1-D chunks, copying at most one slice of it at a time.

    `reshape(-1)` is a view of a contiguous gradient; of any other (a channels_last
    convolution's, a transposed weight's) it would copy the whole gradient, so those are
    flattened one slice along dim 0 at a time.
    """
    if grad.is_contiguous() or grad.dim() < 2:
        yield from grad.reshape(-1).split(CHUNK_ELEMENTS)
        return
    for part in grad.unbind(0):
        yield from part.reshape(-1).split(CHUNK_ELEMENTS)
