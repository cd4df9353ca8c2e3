"""Graph cuts by read-out: a value taken out of the graph (`.item()`, `float()`, `int()`,
`.detach()`, `.numpy()`, `torch.tensor(t)`) whose parameters then get no gradient.

NOTE [graph cuts by read-out]: REINFORCE written as `log_prob.item() * ret`, a loss rebuilt
as a new leaf from such numbers, or log-probabilities re-wrapped with `torch.tensor(lp)`,
trains nothing behind the read-out, and PyTorch says nothing. A read-out is seen as the op
`aten::_local_scalar_dense` (a Python number) or `aten::detach` of a tensor with a grad_fn
(`.detach()`, `.numpy(force=True)`, `torch.tensor(t)`; `.numpy()` needs a detached tensor),
by the write log's dispatch mode or the native core's observer. `.tolist()` reads memory
without an op and is not seen. gradtrace walks a bounded part of the graph behind the
value for the leaves that require grad (at most MAX_BEHIND, weakly held) and puts a
pre-hook on its autograd node: the hook fires when a backward runs through the node. When
an optimizer that holds some of those parameters steps, the hook never fired and none of
them has a gradient, the value left the graph there: a `graph-cut` finding names the line.
Logging `loss.item()` or a term of the loss, and detaching targets (`value.detach()` of a
critic that trains through another loss), stay silent: backward runs through the node, or
its parameters got gradients.

The node itself is never kept: a graph nobody backpropagates (a teacher model called
without no_grad, then detached) is freed when the program drops it, as without gradtrace;
the pre-hook's handle holds the node's hooks weakly.

Cost: one frame walk, one bounded graph walk and one hook per read-out of a tensor with a
grad_fn (a few per step).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch

from gradtrace.analysis.culprits import graph_cut
from gradtrace.events import Finding
from gradtrace.probes.frames import Caller, CallerFinder, source_line
from gradtrace.probes.guard import GuardedProbe, ProbeGuard
from gradtrace.probes.modules import LOOP_OWNER, ModuleStackProbe
from gradtrace.probes.own_ops import in_own_ops
from gradtrace.probes.steps import StepProbe

# Read-outs kept per step until an optimizer judges them: a rollout reads out every step.
MAX_PENDING = 256
# Autograd nodes visited, and parameters kept, to know the parameters behind a read-out.
MAX_NODES = 2000
MAX_BEHIND = 32
# Optimizer steps a read-out waits for one that holds its parameters.
MAX_WAIT_STEPS = 4


class _Readout:
    __slots__ = (
        "behind",
        "caller",
        "complete",
        "handle",
        "op",
        "owner",
        "reached",
        "step",
        "waited",
    )

    def __init__(
        self,
        node: Any,
        behind: list[torch.Tensor],
        complete: bool,
        op: str,
        caller: Caller | None,
        owner: str,
        step: int,
    ) -> None:
        self.behind = [weakref.ref(parameter) for parameter in behind]
        self.complete = complete
        self.op = op
        self.caller = caller
        self.owner = owner
        self.step = step
        self.reached = False
        self.waited = 0
        self.handle = node.register_prehook(self._reach)

    def _reach(self, grad_outputs: object) -> None:
        self.reached = True

    def verdict(self, held: set[int]) -> list[torch.Tensor] | None:
        """None while no parameter behind the value is `held` by the stepping optimizer;
        else the held ones if none of them has a gradient, or [] as soon as one has.

        A gradient left as zeros (`zero_grad(set_to_none=False)`) counts as one: a cut may
        then go unreported, never a false one reported.
        """
        behind = [p for ref in self.behind if (p := ref()) is not None and id(p) in held]
        if not behind:
            return None
        if any(parameter.grad is not None for parameter in behind):
            return []
        return behind


class ReadoutProbe(GuardedProbe):
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

    def _install(self, stack: ExitStack) -> None:
        self._steps.on_grads_ready(self._guard(self._judge))
        stack.callback(self._drop)

    def _seen(self, tensor: torch.Tensor, op: str) -> None:
        """`op` took a value out of the graph (any thread, the op's own)."""
        node = tensor.grad_fn
        if node is None or in_own_ops() or len(self._pending) >= MAX_PENDING:
            return
        behind, complete = _parameters_behind(node)
        if not behind:
            return
        owner = self._modules.current() or LOOP_OWNER
        caller = self._callers.caller()
        self._pending.append(_Readout(node, behind, complete, op, caller, owner, self._steps.step))

    def _judge(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._pending:
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        keep: list[_Readout] = []
        reported: set[tuple[object, int]] = set()
        for readout in self._pending:
            behind = None if readout.reached else readout.verdict(held)
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
                    op=readout.op,
                    owner=readout.owner,
                    step=readout.step,
                    parameters=verdict,
                    complete=readout.complete,
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


def _parameters_behind(node: Any) -> tuple[list[torch.Tensor], bool]:
    """The leaves that require grad behind `node` (parameters and the like), depth first,
    and whether the walk saw all of them (no more than MAX_BEHIND, within MAX_NODES)."""
    seen: set[int] = set()
    todo = [node]
    behind: list[torch.Tensor] = []
    while todo:
        if len(seen) >= MAX_NODES or len(behind) >= MAX_BEHIND:
            return behind, False
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        variable = getattr(current, "variable", None)
        if isinstance(variable, torch.Tensor):
            behind.append(variable)
        todo.extend(next_node for next_node, _ in current.next_functions)
    return behind, True
