"""Read device values one step late, without draining the GPU's queue.

NOTE [why not `.tolist()` one step late]: a device-to-host copy on the current stream waits
for *all* queued work, including the step that was just launched, so reading last step's
numbers with `.tolist()` still stalls the pipeline. Instead the values are copied into pinned
host memory with `non_blocking=True` and an event is recorded right after; reading waits on
that event only, i.e. on work that was queued before it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gradtrace.probes.own_ops import own_ops


class DeferredValues:
    """A 1-D tensor of results, readable later as Python floats."""

    __slots__ = ("_event", "_host")

    def __init__(self, values: torch.Tensor) -> None:
        if values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            with own_ops():
                self._host.copy_(values, non_blocking=True)
            self._event: torch.cuda.Event | None = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values
            self._event = None

    def read(self) -> list[float]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


# Values taken from the queue, with what to do with the numbers.
Ready = tuple[DeferredValues, Callable[[list[float]], None]]


def stack_scalars(values: list[torch.Tensor]) -> torch.Tensor:
    """One 1-D tensor from 0-d tensors, in as few ops as possible (one, usually).

    Values on other devices than the first accelerator among them (rare: a CPU loss logged
    next to CUDA norms) are moved there: moving a CPU value to a device is an asynchronous
    copy, while moving a device value to the CPU would synchronise.
    """
    with own_ops(*values):
        device = values[0].device
        if any(v.device != device for v in values):
            device = next(v.device for v in values if v.device.type != "cpu")
            values = [v.to(device, non_blocking=True) for v in values]
        return torch.stack(values)


class DeferredQueue:
    """Results waiting to be read, each with what to do with the numbers once read.

    `take(keep_current=True)` at a step end hands over only what was queued before the
    previous step end, so reading never waits for GPU work of the step that just ended (its
    gradient statistics, its logged loss, its optimizer update). `take()` hands over
    everything. `deliver` reads what was taken and passes the numbers on; it may run on
    another thread.
    """

    def __init__(self) -> None:
        self._pending: list[Ready] = []
        # Entries queued before the last step end: readable at the next one.
        self._previous = 0

    def push(self, values: torch.Tensor, on_ready: Callable[[list[float]], None]) -> None:
        self._pending.append((DeferredValues(values), on_ready))

    def take(self, *, keep_current: bool = False) -> list[Ready]:
        ready = self._pending[: self._previous if keep_current else len(self._pending)]
        del self._pending[: len(ready)]
        self._previous = len(self._pending)
        return ready


def deliver(ready: list[Ready]) -> None:
    for values, on_ready in ready:
        on_ready(values.read())
