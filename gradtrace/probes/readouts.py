"""Graph cuts by read-out: a value taken out of the graph as a Python number (`.item()`,
`float()`, `int()`) whose parameters then get no gradient.

NOTE [graph cuts by read-out]: REINFORCE written as `log_prob.item() * ret`, or a loss
rebuilt as a new leaf from such numbers, trains nothing behind the read-out, and PyTorch
says nothing. A read-out is seen as the op `aten::_local_scalar_dense` (by the write log's
dispatch mode, or the native core's observer). For a tensor that requires grad, gradtrace
keeps its autograd node and puts a pre-hook on it: the hook fires when a backward runs
through the node. When an optimizer that holds parameters behind the node steps and the
hook never fired and none of those parameters has a gradient, the value left the graph
there: a `graph-cut` finding names the read-out's line. Logging `loss.item()` or a term of
the loss stays silent (backward runs through it, or its parameters got gradients).

Cost: one frame walk and one hook per read-out of a tensor that requires grad (a few per
step); the graph walk runs only for read-outs backward never reached.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch

from gradtrace.analysis.culprits import graph_cut
from gradtrace.events import Finding
from gradtrace.probes.frames import Caller, CallerFinder, source_line
from gradtrace.probes.guard import ProbeGuard
from gradtrace.probes.modules import LOOP_OWNER, ModuleStackProbe
from gradtrace.probes.own_ops import in_own_ops
from gradtrace.probes.steps import StepProbe

# Read-outs kept per step until an optimizer judges them: a rollout reads out every step.
MAX_PENDING = 256
# Autograd nodes visited to find the parameters behind a read-out.
MAX_NODES = 20000
# Optimizer steps a read-out waits for one that holds its parameters.
MAX_WAIT_STEPS = 4


class _Readout:
    __slots__ = ("caller", "handle", "node", "owner", "reached", "step", "waited")

    def __init__(self, node: Any, caller: Caller | None, owner: str, step: int) -> None:
        self.node = node
        self.caller = caller
        self.owner = owner
        self.step = step
        self.reached = False
        self.waited = 0
        self.handle = node.register_prehook(self._reach)

    def _reach(self, grad_outputs: object) -> None:
        self.reached = True


class ReadoutProbe:
    """Keeps read-outs of tensors that require grad until an optimizer step judges them."""

    def __init__(
        self,
        modules: ModuleStackProbe,
        steps: StepProbe,
        callers: CallerFinder,
        on_finding: Callable[[Finding], None],
        *,
        guard: ProbeGuard | None = None,
    ) -> None:
        self._guard = guard or ProbeGuard("read-out check", step=lambda: steps.step)
        self._modules = modules
        self._steps = steps
        self._callers = callers
        self._on_finding = on_finding
        self._pending: list[_Readout] = []
        self.seen = self._guard(self._seen)

    def install(self, stack: ExitStack) -> None:
        self._steps.on_grads_ready(self._guard(self._judge))
        stack.callback(self._drop)

    def _seen(self, tensor: torch.Tensor) -> None:
        """A tensor was read out as a Python number (any thread, the op's own)."""
        if in_own_ops() or not tensor.requires_grad or len(self._pending) >= MAX_PENDING:
            return
        node = tensor.grad_fn
        if node is None:
            return
        owner = self._modules.current() or LOOP_OWNER
        self._pending.append(_Readout(node, self._callers.caller(), owner, self._steps.step))

    def _judge(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._pending:
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        keep: list[_Readout] = []
        reported: set[tuple[object, int]] = set()
        for readout in self._pending:
            behind = None if readout.reached else _cut_parameters(readout.node, held)
            verdict = None if behind is None else [self._name(p) for p in behind]
            if verdict is None and not readout.reached:
                readout.waited += 1
                if readout.waited < MAX_WAIT_STEPS:
                    keep.append(readout)
                    continue
            readout.handle.remove()
            if not verdict or readout.caller in reported:
                continue
            reported.add(readout.caller)
            self._on_finding(
                graph_cut(
                    source_line(readout.caller),
                    owner=readout.owner,
                    step=readout.step,
                    parameters=verdict,
                )
            )
        self._pending = keep

    def _name(self, parameter: torch.Tensor) -> str:
        entry = self._modules.parameter_entry(parameter)
        return entry[0] if entry is not None else f"a parameter of shape {tuple(parameter.shape)}"

    def _drop(self) -> None:
        for readout in self._pending:
            readout.handle.remove()
        self._pending = []


def _cut_parameters(node: Any, held: set[int]) -> list[torch.Tensor] | None:
    """None while no parameter behind `node` is `held` by the stepping optimizer; else those
    parameters if none of them has a gradient, or [] as soon as one has.

    Depth first, so a graph that reaches trained parameters (a logged loss) answers after a
    few nodes. A gradient left as zeros (`zero_grad(set_to_none=False)`) counts as one: a
    cut may then go unreported, never a false one reported.
    """
    seen: set[int] = set()
    todo = [node]
    behind: list[torch.Tensor] = []
    while todo and len(seen) < MAX_NODES:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        variable = getattr(current, "variable", None)
        if isinstance(variable, torch.Tensor) and id(variable) in held:
            if variable.grad is not None:
                return []
            behind.append(variable)
        todo.extend(next_node for next_node, _ in current.next_functions)
    return behind or None
