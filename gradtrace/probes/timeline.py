"""Timeline of chosen steps: forward and backward spans per module call, optimizer step spans
and every in-place write, each with the thread it ran on. It feeds `trace.json`.

Only the steps in `TraceSteps` are timed. Between them this probe has no hook installed at
all: its global forward and optimizer hooks are registered when a traced step begins and
removed when it ends, so the cost outside traced steps is one range check per step.

NOTE [backward spans]: module backward hooks break in-place models (see modules.py), so a
module call's backward span is put together from light hooks, registered in the call's
forward post-hook on traced steps only:
- it starts when the gradient of the module's output is complete (a tensor hook on each
  output tensor, returning None);
- it ends at the latest of: the output's autograd node finishing (a node post-hook), the
  module's own parameters receiving their accumulated gradient (post-accumulate-grad hooks,
  removed when the step ends; for a module called several times, an accumulation belongs to
  the call whose backward started last, which is the first call), and the ends of its
  children's spans.
The approximation: a parameter-free module with several ops (a functional attention core,
say) ends when its output's node finishes, i.e. too early; a module whose output feeds
several consumers starts when the last of them is done. The tensor and node hooks hold only
a small `_Call` record (names and times, never a tensor) and go away with the graph.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from gradtrace.errors import GradtraceError
from gradtrace.events import BACKWARD, FORWARD, OPTIMIZER, Span, TracedWrite
from gradtrace.probes import _torch_compat
from gradtrace.probes.frames import Caller, source_line
from gradtrace.probes.guard import GuardedProbe, ProbeGuard
from gradtrace.probes.modules import ModuleStackProbe, thread_stack

DEFAULT_TRACE_STEPS = "0-2"
# A step records at most this many spans and writes (a loop without optimizer stays in step
# 0 forever); past it the step's timeline is cut short.
MAX_EVENTS_PER_STEP = 50_000

_SPEC = re.compile(r"^(\d+)(?:-(\d+))?$")


class TraceSteps:
    """Which optimizer steps get a timeline: `"0-2,10"` (ranges and single steps) or `"none"`."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self.ranges = tuple(sorted(ranges))

    @classmethod
    def parse(cls, spec: str | Iterable[int] | TraceSteps) -> TraceSteps:
        """From `"0-2,10"`, `"none"`, an iterable of step indices, or a TraceSteps."""
        if isinstance(spec, TraceSteps):
            return spec
        if not isinstance(spec, str):
            return cls((step, step) for step in spec)
        text = spec.replace(" ", "")
        if text in ("", "none"):
            return cls()
        ranges = []
        for part in text.split(","):
            match = _SPEC.match(part)
            if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
                raise GradtraceError(
                    f"Bad trace steps '{spec}': use steps and ranges such as 0-2,10, or none."
                )
            ranges.append((int(match[1]), int(match[2] or match[1])))
        return cls(ranges)

    def __contains__(self, step: int) -> bool:
        return any(first <= step <= last for first, last in self.ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TraceSteps) and other.ranges == self.ranges

    def __hash__(self) -> int:
        return hash(self.ranges)

    def __str__(self) -> str:
        """The spec `parse` reads back: `0-2,10` or `none`."""
        parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in self.ranges]
        return ",".join(parts) or "none"

    def __repr__(self) -> str:
        return f"TraceSteps('{self}')"


class _Call:
    """One module call of a traced step: its forward and (once seen) backward times."""

    __slots__ = (
        "bwd_end_ns",
        "bwd_start_ns",
        "bwd_thread",
        "depth",
        "end_ns",
        "module",
        "name",
        "params_done",
        "parent",
        "start_ns",
        "thread",
    )

    def __init__(self, module: int, name: str, parent: _Call | None, thread: int) -> None:
        # id() of the module: the record must not keep the module alive.
        self.module = module
        self.name = name
        self.parent = parent
        self.depth = 0 if parent is None else parent.depth + 1
        self.thread = thread
        self.start_ns = time.time_ns()
        self.end_ns: int | None = None
        self.bwd_start_ns: int | None = None
        self.bwd_end_ns: int | None = None
        self.bwd_thread = thread
        self.params_done = False

    def output_grad(self, grad: torch.Tensor) -> None:
        """Tensor hook on an output: its gradient is complete, the module's backward starts."""
        if self.bwd_start_ns is None:
            self.bwd_start_ns = time.time_ns()
            self.bwd_thread = threading.get_native_id()

    def output_node_done(self, grad_inputs: object, grad_outputs: object) -> None:
        """Node post-hook on the output's grad_fn: the module's last op has its gradient."""
        self.ended(time.time_ns())

    def ended(self, t_ns: int) -> None:
        if self.bwd_start_ns is not None:
            self.bwd_end_ns = t_ns if self.bwd_end_ns is None else max(self.bwd_end_ns, t_ns)


class _ParamWatch:
    """Post-accumulate-grad hook of one parameter for one traced step."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls: list[_Call] = []

    def accumulated(self, param: torch.Tensor) -> None:
        started = [c for c in self.calls if c.bwd_start_ns is not None and not c.params_done]
        if started:
            call = max(started, key=lambda c: c.bwd_start_ns or 0)
            call.params_done = True
            call.ended(time.time_ns())


class TimelineProbe(GuardedProbe):
    """Times module calls, optimizer steps and writes on the steps in `steps`.

    The session calls `take()` when a step ends (or the run stops) and `begin_step()` with
    the next step's index. `on_recording(True)` says a traced step begins, and
    `on_recording(False)` that recording stopped: the session then has the write log report
    writes through `add_write()` while a traced step runs.
    """

    def __init__(
        self,
        modules: ModuleStackProbe,
        steps: TraceSteps,
        *,
        on_recording: Callable[[bool], None] | None = None,
        guard: ProbeGuard | None = None,
    ) -> None:
        guard = self._guard = guard or ProbeGuard("timeline")
        # The session's and the write log's calls: failures there are this probe's. A
        # step taken while off (or failing) has no timeline.
        self.begin_step = guard(self.begin_step, fallback=self._off)  # type: ignore[method-assign]
        self.take = guard(self.take)  # type: ignore[method-assign]
        self.add_write = guard(self.add_write)  # type: ignore[method-assign]
        self._modules = modules
        self._steps = steps
        self._on_recording = on_recording
        self._local = threading.local()
        self._handles: list[RemovableHandle] = []
        self._param_handles: list[RemovableHandle] = []
        self._watches: dict[int, _ParamWatch] = {}
        self._calls: list[_Call] = []
        self._writes: list[tuple[int, int, str, str, str, Caller | None]] = []
        self._optimizer: tuple[str, int, int] | None = None
        self._threads: dict[int, str] = {}
        self._new_threads: dict[int, str] = {}
        self.recording = False

    def _install(self, stack: ExitStack) -> None:
        stack.callback(self._stop_recording)
        self.begin_step(0)

    def _off(self, step: int) -> None:
        """Once the probe is off: no hook of it stays installed."""
        if self.recording:
            self._stop_recording()

    def begin_step(self, step: int) -> None:
        """Install the timing hooks if `step` is traced, remove them otherwise."""
        if step in self._steps:
            self._start_recording()
        else:
            self._stop_recording()

    def _start_recording(self) -> None:
        if self.recording:
            return
        self.recording = True
        guard = self._guard
        self._handles = [
            register_module_forward_pre_hook(guard(self._enter)),
            register_module_forward_hook(guard(self._leave), always_call=True),
            register_optimizer_step_pre_hook(guard(self._optimizer_starts)),
        ]
        if self._on_recording is not None:
            self._on_recording(True)

    def _stop_recording(self) -> None:
        self.recording = False
        if self._on_recording is not None:
            self._on_recording(False)
        for handle in [*self._handles, *self._param_handles]:
            handle.remove()
        self._handles, self._param_handles = [], []
        self._watches.clear()

    def _full(self) -> bool:
        return len(self._calls) + len(self._writes) >= MAX_EVENTS_PER_STEP

    def _thread(self) -> int:
        thread = threading.get_native_id()
        if thread not in self._threads:
            self._name_thread(thread, backward=_torch_compat.in_backward())
        return thread

    def _name_thread(self, thread: int, *, backward: bool) -> None:
        self._threads[thread] = self._new_threads[thread] = _thread_name(thread, backward)

    def _stack(self) -> list[_Call]:
        return thread_stack(self._local)

    def _enter(self, module: nn.Module, args: object) -> None:
        if _torch_compat.compiling() or self._full():
            return
        stack = self._stack()
        parent = stack[-1] if stack else None
        call = _Call(id(module), self._modules.name_of(module), parent, self._thread())
        self._calls.append(call)
        stack.append(call)
        self._watch_params(module, call)

    def _leave(self, module: nn.Module, args: object, output: object) -> None:
        if _torch_compat.compiling():
            return
        stack = self._stack()
        mine = id(module)
        if not any(call.module == mine for call in stack):
            return  # entered before recording began, or when the step was full
        # Pop down to this module's call: a forward that raised may have left inner ones.
        while stack:
            call = stack.pop()
            if call.module == mine:
                call.end_ns = time.time_ns()
                if torch.is_grad_enabled():
                    _hook_outputs(output, call, self._guard)
                return

    def _watch_params(self, module: nn.Module, call: _Call) -> None:
        if not torch.is_grad_enabled():
            return
        for param in module.parameters(recurse=False):
            # Not a leaf: torch.func.functional_call swaps in computed tensors (no such hook).
            if not (param.requires_grad and param.is_leaf):
                continue
            watch = self._watches.get(id(param))
            if watch is None:
                watch = self._watches[id(param)] = _ParamWatch()
                self._param_handles.append(
                    param.register_post_accumulate_grad_hook(self._guard(watch.accumulated))
                )
            watch.calls.append(call)

    def _optimizer_starts(self, optimizer: Optimizer, args: object, kwargs: object) -> None:
        if self._optimizer is None:
            name = f"{type(optimizer).__name__}.step"
            self._optimizer = (name, self._thread(), time.time_ns())

    def add_write(self, op: str, owner: str, phase: str, caller: Caller | None) -> None:
        """One mutating op of a traced step (called by the write log)."""
        if not self._full():
            self._writes.append((time.time_ns(), self._thread(), op, owner, phase, caller))

    def take(self, step: int) -> tuple[list[Span], list[TracedWrite], dict[int, str]]:
        """The step's finished spans, its writes, and threads first seen since the last take.

        Spans whose backward has not run yet are left out; the step's records are cleared.
        """
        now = time.time_ns()
        calls, self._calls = self._calls, []
        writes, self._writes = self._writes, []
        spans = _call_spans(step, calls)
        for span in spans:
            if span.thread not in self._threads:
                self._name_thread(span.thread, backward=True)  # autograd's device threads
        if self._optimizer is not None:
            name, thread, start = self._optimizer
            spans.append(Span(step, OPTIMIZER, name, thread, 0, start, now))
            self._optimizer = None
        for handle in self._param_handles:
            handle.remove()
        self._param_handles = []
        self._watches.clear()
        threads, self._new_threads = self._new_threads, {}
        sources = {caller: source_line(caller, context=0) for *_, caller in writes}
        traced = [
            TracedWrite(step, t_ns, thread, op, owner, phase, sources[caller])
            for t_ns, thread, op, owner, phase, caller in writes
        ]
        return spans, traced, threads


def _hook_outputs(output: object, call: _Call, guard: ProbeGuard) -> None:
    """Hook every output tensor that has a gradient to come (never a leaf: see grads.py)."""
    for tensor in _tensors(output):
        grad_fn = tensor.grad_fn
        if grad_fn is not None:
            tensor.register_hook(guard(call.output_grad))
            grad_fn.register_hook(guard(call.output_node_done))


def _tensors(output: object, depth: int = 0) -> Iterable[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        yield output
    elif depth < 2 and isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item, depth + 1)
    elif depth < 2 and isinstance(output, dict):
        for item in output.values():
            yield from _tensors(item, depth + 1)


def _call_spans(step: int, calls: list[_Call]) -> list[Span]:
    """Forward spans of finished calls and backward spans of calls whose backward ran.

    A call's backward span is widened to cover its children's (same thread), innermost first,
    so the module nesting of forward holds in backward too.
    """
    for call in reversed(calls):
        parent = call.parent
        if (
            parent is not None
            and call.bwd_end_ns is not None
            and parent.bwd_start_ns is not None
            and parent.bwd_thread == call.bwd_thread
        ):
            assert call.bwd_start_ns is not None
            parent.bwd_start_ns = min(parent.bwd_start_ns, call.bwd_start_ns)
            parent.ended(call.bwd_end_ns)
    spans = []
    for call in calls:
        if call.end_ns is not None:
            spans.append(
                Span(step, FORWARD, call.name, call.thread, call.depth, call.start_ns, call.end_ns)
            )
        if call.bwd_start_ns is not None and call.bwd_end_ns is not None:
            spans.append(
                Span(
                    step,
                    BACKWARD,
                    call.name,
                    call.bwd_thread,
                    call.depth,
                    call.bwd_start_ns,
                    call.bwd_end_ns,
                )
            )
    return spans


def _thread_name(native_id: int, backward: bool) -> str:
    """The thread's Python name; autograd's device threads are not Python threads."""
    for thread in threading.enumerate():
        if thread.native_id == native_id:
            return thread.name
    if backward:
        return f"autograd engine {native_id}"
    return f"thread {native_id}"
