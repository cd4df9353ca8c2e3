"""GradScaler awareness: skipped steps and the loss scale, one value each per iteration.

`GradScaler.step` skips `optimizer.step()` when the unscaled gradients hold Inf/NaN, so the
optimizer hooks never see those iterations. `GradScaler.update` ends every iteration,
skipped or not, and holds the iteration's found-inf flags; gradtrace wraps it for the
session (the original is restored on close) to read them, with the scale, on device.

NOTE [why a wrapper]: torch offers no hook on GradScaler. The wrapper calls the original
with the same arguments and returns its result; it only queues two values for later reading.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import ExitStack

import torch
from torch.amp import GradScaler

from gradtrace.analysis.grad_health import FOUND_INF
from gradtrace.probes import _torch_compat
from gradtrace.probes.deferred import DeferredQueue
from gradtrace.probes.guard import GuardedProbe, ProbeGuard
from gradtrace.probes.own_ops import own_ops
from gradtrace.probes.steps import StepProbe

SCALE = "amp/scale"


class GradScalerProbe(GuardedProbe):
    def __init__(
        self,
        steps: StepProbe,
        queue: DeferredQueue,
        on_values: Callable[[int, dict[str, float]], None],
        on_iteration_end: Callable[[], None],
        *,
        guard: ProbeGuard | None = None,
    ) -> None:
        self._guard = guard or ProbeGuard("AMP loss scale", step=lambda: steps.step)
        self._steps = steps
        self._queue = queue
        self._on_values = on_values
        self._on_iteration_end = on_iteration_end

    def _install(self, stack: ExitStack) -> None:
        original = GradScaler.update
        before_update = self._guard(self._before_update)

        @functools.wraps(original)
        def update(scaler: GradScaler, new_scale: float | torch.Tensor | None = None) -> None:
            if new_scale is None:
                before_update(scaler)
            return original(scaler, new_scale)

        GradScaler.update = update  # type: ignore[method-assign]
        stack.callback(setattr, GradScaler, "update", original)

    def _before_update(self, scaler: GradScaler) -> None:
        state = _torch_compat.grad_scaler_found_inf(scaler)
        self._on_iteration_end()
        if state is None:
            return
        found, scale = state
        with own_ops():
            device = scale.device
            found_any = torch.stack([f.to(device, non_blocking=True) for f in found]).sum()
            values = torch.stack([scale.reshape(()), found_any.to(scale.dtype)])
        step = self._steps.step
        self._queue.push(
            values,
            self._guard(
                lambda read: self._on_values(step, {SCALE: read[0], FOUND_INF: float(read[1] > 0)})
            ),
        )
