"""Step boundaries and the optimizer phase, from torch's global optimizer step hooks.

A run in which no optimizer steps (a manual loop updating `p.data`) counts its steps by
backward passes instead: see probes/backward_steps.py, which calls `end_backward_step`.

NOTE [closures]: `optimizer.step(closure)` (LBFGS, Lightning's default loop) runs the user's
forward and backward *inside* the step, after the pre-hook fired. The pre-hook therefore
wraps the closure: while it runs, the optimizer phase is off (its writes belong to the
model), and gradients are announced ready when its first call returns.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from torch.optim import Optimizer
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from gradtrace.probes.guard import GuardedProbe, ProbeGuard

# How steps are counted (stored as the run's `steps_counted_by`).
BY_OPTIMIZER = "optimizer"
BY_BACKWARD = "backward"


class StepProbe(GuardedProbe):
    """Counts optimizer steps and says which optimizer, if any, is stepping right now.

    `step` is the index of the step in progress: 0 until the first `optimizer.step()`
    returns. Each completed step calls `on_step_end(step)` before the count advances.
    Callbacks given to `on_grads_ready` run once per step, when the gradients the step
    will use are complete (before the update); those given to `on_updated` once the
    optimizer has updated the parameters, before the step ends.
    """

    def __init__(
        self, on_step_end: Callable[[int], None], *, guard: ProbeGuard | None = None
    ) -> None:
        self._guard = guard or ProbeGuard("step counter", step=lambda: self.step)
        self.step = 0
        self._on_step_end = on_step_end
        self._grads_ready: list[Callable[[Optimizer], None]] = []
        self._plain_update: list[tuple[Callable[[], None], Callable[[], None]]] = []
        self._updated: list[Callable[[Optimizer], None]] = []
        self._local = threading.local()
        # Told the stepping optimizer's label on this thread (None when it returns) and each
        # new step index: the native core labels writes and saved tensors without calling back.
        self._publish_optimizer: Callable[[str | None], None] | None = None
        self._publish_step: Callable[[int], None] | None = None
        # Set by the first optimizer step; steps counted by backward passes before it.
        self.optimizer_stepped = False
        self.backward_steps = 0

    def publish_to(
        self,
        *,
        optimizer: Callable[[str | None], None] | None,
        step: Callable[[int], None] | None,
    ) -> None:
        """Call `optimizer(label)` as the stepping optimizer changes, `step(n)` as a step ends."""
        self._publish_optimizer = optimizer
        self._publish_step = step

    def _set_optimizer(self, label: str | None) -> None:
        self._local.optimizer = label
        if self._publish_optimizer is not None:
            self._publish_optimizer(label)

    def _install(self, stack: ExitStack) -> None:
        stack.enter_context(register_optimizer_step_pre_hook(self._guard(self._before)))
        stack.enter_context(register_optimizer_step_post_hook(self._guard(self._after)))

    def on_grads_ready(self, callback: Callable[[Optimizer], None]) -> None:
        self._grads_ready.append(callback)

    def around_plain_update(self, before: Callable[[], None], after: Callable[[], None]) -> None:
        """Call `before` as a step without a closure starts its update, `after` as it ends.

        A step with a closure runs the user's forward and backward inside it, so it is
        never "plain". `after` is not called for a step that raised.
        """
        self._plain_update.append((before, after))

    def on_updated(self, callback: Callable[[Optimizer], None]) -> None:
        self._updated.append(callback)

    @property
    def optimizer(self) -> str | None:
        """`AdamW.step` while an AdamW steps on this thread, else None (also once this
        probe is off: a step it saw start may never be seen to end)."""
        return getattr(self._local, "optimizer", None) if self._guard.on else None

    @property
    def counted_by(self) -> str | None:
        """Which rule counts the steps: BY_OPTIMIZER, BY_BACKWARD (no optimizer stepped)
        or None (no step yet)."""
        if self.optimizer_stepped:
            return BY_OPTIMIZER
        return BY_BACKWARD if self.backward_steps else None

    def end_backward_step(self) -> None:
        """A backward pass finished in a run where no optimizer steps: it ends the step."""
        self.backward_steps += 1
        self._end(self.step)

    def _before(
        self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        self.optimizer_stepped = True
        self._set_optimizer(f"{type(optimizer).__name__}.step")
        # `args` starts with the optimizer itself: the closure, if any, comes after it.
        if kwargs.get("closure") is not None:
            return args, {**kwargs, "closure": self._wrap(optimizer, kwargs["closure"])}
        if len(args) > 1 and callable(args[1]):
            return (args[0], self._wrap(optimizer, args[1]), *args[2:]), kwargs
        self._announce(optimizer)
        self._local.plain = True
        for before, _ in self._plain_update:
            before()
        return None

    def _after(self, optimizer: Optimizer, args: object, kwargs: object) -> None:
        if getattr(self._local, "plain", False):
            self._local.plain = False
            for _, after in reversed(self._plain_update):
                after()
        self._set_optimizer(None)
        for callback in self._updated:
            callback(optimizer)
        self._end(self.step)

    def _end(self, step: int) -> None:
        self._on_step_end(step)
        self.step = step + 1
        if self._publish_step is not None:
            self._publish_step(self.step)

    def _wrap(self, optimizer: Optimizer, closure: Callable[..., Any]) -> Callable[..., Any]:
        calls = 0

        @functools.wraps(closure)
        def traced_closure(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            label = self.optimizer
            self._set_optimizer(None)
            try:
                result = closure(*args, **kwargs)
            finally:
                self._set_optimizer(label)
            calls += 1
            if calls == 1:
                self._announce(optimizer)
            return result

        return traced_closure

    def _announce(self, optimizer: Optimizer) -> None:
        for callback in self._grads_ready:
            callback(optimizer)
