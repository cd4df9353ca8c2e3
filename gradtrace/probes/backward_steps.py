"""Steps of a training loop that no optimizer steps: one per backward pass.

A manual loop (`p.data.add_(p.grad, alpha=-lr)`, as pytorch/examples' word_language_model
does) never calls a `torch.optim` optimizer, so the optimizer hooks that count steps and
take gradient statistics never fire. This probe puts a post-accumulate-grad hook on the
parameters of every module that runs a forward; the first one to fire in a backward pass
asks autograd to call back once that pass has finished, and then, when no optimizer is in
sight, the pass ends a step: its gradients are recorded and the step counter moves on.

NOTE [one rule per run]: whether an optimizer exists is decided once, at the end of the
first backward pass, by looking for a live `torch.optim.Optimizer` that holds a parameter
the pass reached or one of the modules that ran, among the objects the garbage collector
tracks (one scan per run; an optimizer of another model, left alive in a notebook or a test
process, does not count). With one, steps stay optimizer steps (several backward passes per
step under gradient accumulation stay one step); without one, backward passes count until an
optimizer first steps, which switches this probe off for good.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from contextlib import ExitStack

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from gradtrace.probes import _torch_compat
from gradtrace.probes.guard import GuardedProbe, ProbeGuard
from gradtrace.probes.modules import ByModule
from gradtrace.probes.steps import StepProbe


class BackwardStepProbe(GuardedProbe):
    """Counts a step per backward pass while no optimizer steps (see the module NOTE)."""

    def __init__(
        self,
        steps: StepProbe,
        record: Callable[[list[torch.Tensor]], None] | None,
        *,
        guard: ProbeGuard | None = None,
    ) -> None:
        self._guard = guard or ProbeGuard("backward steps", step=lambda: steps.step)
        self._steps = steps
        # Gradient statistics of the pass (None when they are off).
        self._record = record
        self._stack: ExitStack | None = None
        self._forward_hook: RemovableHandle | None = None
        self._seen: ByModule[bool] = ByModule()
        # Parameters hooked, by id (tensors cannot be weak dictionary keys), and the hooks.
        self._hooked: dict[int, weakref.ref[torch.Tensor]] = {}
        self._handles: list[RemovableHandle] = []
        # The backward pass whose end is awaited, and the parameters it reached so far.
        self._task = -1
        self._reached: dict[int, torch.Tensor] = {}
        # None until the first pass ends; then whether backward passes count steps.
        self._counting: bool | None = None

    def _install(self, stack: ExitStack) -> None:
        self._stack = stack
        self._forward_hook = stack.enter_context(
            register_module_forward_hook(self._guard(self._after_forward))
        )

    @property
    def _off(self) -> bool:
        return self._counting is False or self._steps.optimizer_stepped

    def _after_forward(self, module: nn.Module, args: object, output: object) -> None:
        if self._off:
            self._stop_watching()
            return
        stack = self._stack
        if stack is None or _torch_compat.compiling() or self._seen.get(module) is not None:
            return
        self._seen[module] = True
        for param in module.parameters(recurse=False):
            known = self._hooked.get(id(param))
            if param.requires_grad and (known is None or known() is not param):
                self._hooked[id(param)] = weakref.ref(param)
                hook = param.register_post_accumulate_grad_hook(self._guard(self._arrived))
                self._handles.append(stack.enter_context(hook))

    def _arrived(self, param: torch.Tensor) -> None:
        if self._off:
            return
        task = _torch_compat.graph_task_id()
        if task != self._task:
            self._task = task
            self._reached = {}
            _torch_compat.at_backward_end(self._guard(self._backward_done))
        self._reached[id(param)] = param

    def _backward_done(self) -> None:
        reached, self._reached, self._task = list(self._reached.values()), {}, -1
        if self._counting is None:
            self._counting = not _an_optimizer_holds([*reached, *self._module_parameters()])
        if self._off:
            self._stop_watching()
            return
        if self._record is not None:
            self._record(reached)
        self._steps.end_backward_step()

    def _module_parameters(self) -> list[torch.Tensor]:
        """The parameters the modules that ran hold now: FSDP2 accumulates into unsharded
        parameters while its optimizer holds the sharded ones, which the modules hold again
        once the pass has resharded them."""
        return [p for module, _ in self._seen.items() for p in module.parameters(recurse=False)]

    def _stop_watching(self) -> None:
        """An optimizer counts the steps: drop every hook now (removing one twice, as the
        session's close then does, is harmless)."""
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()


def _an_optimizer_holds(params: list[torch.Tensor]) -> bool:
    """Whether a live torch.optim optimizer holds one of `params` (NOTE [one rule per run])."""
    wanted = {id(param) for param in params}
    return any(
        id(param) in wanted
        for obj in gc.get_objects()
        # type(), not isinstance: isinstance reads `__class__`, which some module proxies
        # answer with a deprecation warning (torch.distributed.reduce_op).
        if issubclass(type(obj), Optimizer)
        for group in obj.param_groups
        for param in group["params"]
    )
