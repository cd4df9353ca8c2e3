"""Step boundaries and the optimizer phase, from torch's global optimizer step hooks."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import ExitStack

from torch.optim import Optimizer
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)


class StepProbe:
    """Counts optimizer steps and says which optimizer, if any, is stepping right now.

    `step` is the index of the step in progress: 0 until the first `optimizer.step()`
    returns. Each completed step calls `on_step_end(step)` before the count advances.
    """

    def __init__(self, on_step_end: Callable[[int], None]) -> None:
        self.step = 0
        self._on_step_end = on_step_end
        self._local = threading.local()

    def install(self, stack: ExitStack) -> None:
        stack.enter_context(register_optimizer_step_pre_hook(self._before))
        stack.enter_context(register_optimizer_step_post_hook(self._after))

    @property
    def optimizer(self) -> str | None:
        """`AdamW.step` while an AdamW steps on this thread, else None."""
        return getattr(self._local, "optimizer", None)

    def _before(self, optimizer: Optimizer, args: object, kwargs: object) -> None:
        self._local.optimizer = f"{type(optimizer).__name__}.step"

    def _after(self, optimizer: Optimizer, args: object, kwargs: object) -> None:
        self._local.optimizer = None
        self._on_step_end(self.step)
        self.step += 1
