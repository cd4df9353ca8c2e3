"""Write log: every mutating op, seen from a TorchDispatchMode.

An op writes when its schema marks an argument `Tensor(a!)` (`alias_info.is_write`); that
covers `x += y`, `relu_`, slice assignment (`copy_`, `fill_`, `index_put_`), `out=` variants
and the `_foreach_*_` / `_fused_*_` kernels optimizers use. Writes through `.data` reach the
dispatcher too, which is how gradtrace sees what the version counter misses.

NOTE [hot path]: this runs for every op. A non-mutating op costs one dict lookup after the
op itself. A mutating op costs a counter bump plus one dict lookup per written tensor; only a
write that lands on live saved memory walks the Python stack to find the user's line.

NOTE [plain optimizer steps]: a write can only matter if it lands on a live saved tensor.
A plain `optimizer.step()` (no closure) that starts with none live usually runs after
backward freed the graph, and is often more than half of a step's ops (a for-loop AdamW:
about ten per parameter). The mode steps aside for it, so those writes are not counted.
A step taken while saved tensors are live (before backward, or with retain_graph), or on a
step chosen for the timeline, is logged as any other code.
NOTE [traced steps]: on the steps chosen for the timeline (`--trace-steps`), `on_write` is
switched to a method that also hands every write, with its user frame, to the callable the
session gave `trace_writes` (the timeline's). Other steps run `record` itself: the fast path
is the same with or without a timeline.

NOTE [versions]: inside `__torch_dispatch__` the version counter is not bumped yet, even
after the op ran: the bump happens above the Python dispatch key. gradtrace compares versions
at unpack time instead, where both are final.
"""

from __future__ import annotations

import itertools
import weakref
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch

from gradtrace.events import BACKWARD, FORWARD, LOOP, OPTIMIZER, Finding
from gradtrace.probes import _torch_compat
from gradtrace.probes.frames import Caller, CallerFinder
from gradtrace.probes.guard import GuardedProbe, ProbeGuard
from gradtrace.probes.modules import LOOP_OWNER, ModuleStackProbe
from gradtrace.probes.own_ops import in_own_ops
from gradtrace.probes.saved import (
    Layout,
    LiveSaved,
    RawWrite,
    blocks_overlap,
    byte_blocks,
    layout_of,
    record_hits,
    untracked_finding,
)
from gradtrace.probes.steps import StepProbe

# (op name, positions of written arguments); op name is empty for ops that write nothing.
_OpInfo = tuple[str, tuple[tuple[int, str], ...]]
_NO_WRITES: _OpInfo = ("", ())
# Takes each write of a traced step: (op, owner, phase, the user's frame).
_AddWrite = Callable[[str, str, str, Caller | None], None]


# What `_op_info` answers for a read-out (NOTE [graph cuts by read-out] in readouts.py).
_READOUTS: dict[torch._ops.OpOverload, _OpInfo] = {
    torch.ops.aten._local_scalar_dense.default: ("_local_scalar_dense", ()),
    torch.ops.aten.detach.default: ("detach", ()),
}


def _op_info(func: torch._ops.OpOverload) -> _OpInfo:
    readout = _READOUTS.get(func)
    if readout is not None:
        return readout
    written = tuple(
        (position, argument.name)
        for position, argument in enumerate(func._schema.arguments)
        if argument.alias_info is not None and argument.alias_info.is_write
    )
    if not written:
        return _NO_WRITES
    return func.overloadpacket.__name__, written


class WriteLogProbe(GuardedProbe):
    """Counts writes per owner and op, and attaches writes on saved memory to their records."""

    def __init__(
        self,
        live: LiveSaved,
        modules: ModuleStackProbe,
        steps: StepProbe,
        callers: CallerFinder,
        *,
        guard: ProbeGuard | None = None,
        on_finding: Callable[[Finding], None] | None = None,
    ) -> None:
        guard = guard or ProbeGuard("write log", step=lambda: steps.step)
        self._guard = guard
        # What the dispatch mode calls (NOTE [probe boundary] in guard.py): an op's write
        # info once per op, and `on_write`, guarded, for each write.
        self.op_info = guard(_op_info, fallback=lambda func: _NO_WRITES)
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self._live = live
        self._modules = modules
        self._steps = steps
        self._callers = callers
        self._seq = itertools.count()
        self._mode = _WriteLogMode(self)
        self._on_finding = on_finding
        # Called with each tensor taken out of the graph and the op (see readouts.py).
        self.readout_seen: Callable[[torch.Tensor, str], None] | None = None
        # Outputs of the modules run inside the current forward, by storage (see NOTE
        # [untracked writes]): (the output, weakly; its module's path; its layout).
        self._outputs: dict[tuple[int, int], list[tuple[weakref.ref, str, Layout]]] = {}
        self._aside = False
        self._add_write: _AddWrite | None = None
        # What the dispatch mode calls for a mutating op: `record`, or on traced steps
        # `_record_traced` (see NOTE [traced steps]).
        self.on_write = self.record
        self.write_seen = guard(self.on_write)

    def trace_writes(self, add_write: _AddWrite | None) -> None:
        """Hand every write, with its user frame, to `add_write` from now on (None: stop)."""
        self._add_write = add_write
        self.on_write = self.record if add_write is None else self._record_traced
        self.write_seen = self._guard(self.on_write)

    @property
    def tracing_writes(self) -> bool:
        """Whether every write is handed on now (a step chosen for trace.json)."""
        return self._add_write is not None

    def live_count(self) -> int:
        """Saved tensors registered by storage now (none between steps: nothing leaks)."""
        return self._live.count()

    def _install(self, stack: ExitStack) -> None:
        stack.enter_context(self._mode)
        # Unwound before the mode's own exit: a step that raised may have left it aside.
        stack.callback(self._step_back)
        guard = self._guard
        self._steps.around_plain_update(guard(self._step_aside), guard(self._step_back))
        # ...and the next forward must be logged even so.
        self._modules.on_root_start(guard(self._step_back))
        if self._on_finding is not None:
            self._modules.on_output(guard(self._note_output))
            self._modules.on_root_start(self._outputs.clear)

    def _note_output(self, path: str, output: object) -> None:
        for tensor in graph_outputs(output):
            key = _torch_compat.storage_key(tensor)
            if key is not None:
                entry = (weakref.ref(tensor), path, layout_of(tensor))
                self._outputs.setdefault(key, []).append(entry)

    def _step_aside(self) -> None:
        if not self._live and not self._aside and self._add_write is None:
            self._aside = _torch_compat.step_aside(self._mode)

    def _step_back(self) -> None:
        if self._aside:
            self._aside = False
            _torch_compat.step_back(self._mode)

    def take_counts(self) -> Counter[tuple[str, str, str]]:
        """Hand over the per-(owner, op, phase) write counts gathered since the last call."""
        counts, self.counts = self.counts, Counter()
        return counts

    def owner_and_phase(self) -> tuple[str, str]:
        optimizer = self._steps.optimizer
        if optimizer is not None:
            return optimizer, OPTIMIZER
        module = self._modules.current()
        if module is not None:
            return module, FORWARD
        if _torch_compat.in_backward():
            node = _torch_compat.current_node_name()
            return (f"backward of {node}" if node else "backward"), BACKWARD
        return LOOP_OWNER, LOOP

    def record(self, op: str, written: tuple[tuple[int, str], ...], args: Any, kwargs: Any) -> None:
        if in_own_ops():
            return
        owner, phase = self.owner_and_phase()
        self.counts[owner, op, phase] += 1
        if phase == FORWARD and (self._outputs or not torch.is_grad_enabled()):
            self._check_untracked(op, owner, written, args, kwargs)
        live = self._live
        if not live:
            return
        for position, name in written:
            value = args[position] if position < len(args) else kwargs.get(name)
            tensors = value if isinstance(value, (list, tuple)) else (value,)
            for tensor in tensors:
                if not isinstance(tensor, torch.Tensor):
                    continue
                key = _torch_compat.storage_key(tensor)
                records = None if key is None else live.on_storage(key)
                if records:
                    record_hits(
                        records,
                        layout_of(tensor),
                        _torch_compat.version_of(tensor),
                        lambda: self._hit(op, owner, phase),
                    )

    def _check_untracked(
        self,
        op: str,
        owner: str,
        written: tuple[tuple[int, str], ...],
        args: Any,
        kwargs: Any,
    ) -> None:
        """NOTE [untracked writes]: a write autograd does not record (through `.detach()`,
        `.data`, or under no_grad) inside a forward, into the output of a module that ran
        inside it or into a parameter, changes values backward depends on without a trace.
        Nothing saved those values yet, so no version check will ever fail."""
        on_finding = self._on_finding
        if on_finding is None:
            return
        grad_on = torch.is_grad_enabled()
        for position, name in written:
            value = args[position] if position < len(args) else kwargs.get(name)
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                if not isinstance(tensor, torch.Tensor) or (grad_on and tensor.requires_grad):
                    continue
                output_of = self._output_written(tensor) if self._outputs else None
                if output_of is None and not tensor.requires_grad:
                    continue
                write = self._hit(op, owner, FORWARD).resolve()
                finding = untracked_finding(self._modules, write, tensor, output_of)
                if finding is not None:
                    on_finding(finding)

    def _output_written(self, tensor: torch.Tensor) -> str | None:
        key = _torch_compat.storage_key(tensor)
        entries = None if key is None else self._outputs.get(key)
        if not entries:
            return None
        blocks = byte_blocks(layout_of(tensor))
        for ref, path, layout in entries:
            if ref() is not None and blocks_overlap(byte_blocks(layout), blocks):
                return path
        return None

    def _hit(self, op: str, owner: str, phase: str) -> RawWrite:
        """A write that hit saved memory, with the module whose code issued it (NOTE
        [modules that override __call__] in modules.py)."""
        caller, this = self._callers.caller_and_self()
        if phase in (FORWARD, LOOP) and this is not None:
            inner = self._modules.owner_of(this)
            if inner is not None:
                owner, phase = inner, FORWARD
        return RawWrite(next(self._seq), op, owner, phase, self._steps.step, caller)

    def _record_traced(
        self, op: str, written: tuple[tuple[int, str], ...], args: Any, kwargs: Any
    ) -> None:
        self.record(op, written, args, kwargs)
        add_write = self._add_write
        if add_write is not None and not in_own_ops():
            owner, phase = self.owner_and_phase()
            add_write(op, owner, phase, self._callers.caller())


class _WriteLogMode(_torch_compat.UntracedDynamoMode):
    def __init__(self, probe: WriteLogProbe) -> None:
        super().__init__()
        self._probe = probe
        # Keyed by id(op): OpOverload.__hash__ is Python code, and ops live for the process.
        self._ops: dict[int, _OpInfo] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        info = self._ops.get(id(func))
        if info is None:
            info = self._ops[id(func)] = self._probe.op_info(func)
        if info[1]:
            self._probe.write_seen(info[0], info[1], args, kwargs or {})
        elif info[0] and args[0].grad_fn is not None and self._probe.readout_seen is not None:
            # Autograd's own detaches (of outputs it saves) see no grad_fn: no call for them.
            self._probe.readout_seen(args[0], info[0])
        return result


def graph_outputs(output: object) -> list[torch.Tensor]:
    """The tensors of a module's output (a tensor, or a tuple or list of them) that are
    part of an autograd graph (the native core's add_activations does the same)."""
    items = output if isinstance(output, (list, tuple)) else (output,)
    return [
        item
        for item in items
        if isinstance(item, torch.Tensor) and item.requires_grad and not item.is_leaf
    ]
