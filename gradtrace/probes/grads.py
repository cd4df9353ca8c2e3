"""Gradient statistics per parameter, computed on device and read one step late.

At every recorded `optimizer.step()`, once its gradients are final (before the update, after
the closure if there is one; under AMP already unscaled by `GradScaler.step`), the probe
launches batched reductions over the optimizer's parameters: gradient L2 norms and, every
ZERO_COUNT_EVERY recorded steps, parameter L2 norms and non-zero counts
(`torch._foreach_norm` with ord 2 and 0). With `update_ratio`, it also copies those
parameters on their device and, once the optimizer has updated them, reduces the difference
to one norm per parameter (the copy is freed right then). The results, with the norms any
`clip_grad_norm_` call returned since the previous step, are queued on the session's
deferred queue; nothing is read back until the next step ends.

NOTE [one read, no cursor]: each statistic is a small unit (`ParamColumn` and its kin below)
that claims its device tensors in the step's `StepValues` and keeps the slice it gets back;
all of a step's tensors are stacked and read in one transfer, and each unit decodes only
its own slice. A new per-parameter statistic is one more `ParamColumn` named after its
`ParamStat` field; no other unit changes.

During forward it also reduces each module's output to one number (its sum in float32:
NaN or Inf anywhere makes it non-finite) and notes modules whose output left the graph
although they have trainable parameters. On sampled steps it also reduces each ReLU's
output to its count of units that are zero for the whole batch, and the gradient reaching
each parameter-free module's output to its L2 norm. Post-accumulate-grad hooks record the
order in which gradients arrive, which is backward order.

NOTE [no backward hooks]: module full backward hooks break in-place models (see
modules.py); post-accumulate-grad hooks on parameters and forward hooks are safe.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import weakref
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook
from torch.optim import Optimizer

from gradtrace.events import ClipCall, ParamStat, SourceLine, StepGradStats
from gradtrace.probes import _torch_compat
from gradtrace.probes.deferred import DeferredQueue, stack_scalars
from gradtrace.probes.frames import Caller, CallerFinder, is_user_code, source_line
from gradtrace.probes.guard import GuardedProbe, ProbeGuard
from gradtrace.probes.modules import ByModule, ModuleStackProbe
from gradtrace.probes.own_ops import own_ops
from gradtrace.probes.steps import BY_BACKWARD, StepProbe

# What a step counted by a backward pass (no optimizer steps) records as its optimizer.
BACKWARD_LABEL = "backward"

# Zero counts (`_foreach_norm` with ord 0) have no fused CUDA kernel: one launch per
# parameter. They are taken on every tenth recorded step, as are parameter norms (weights
# move slowly; with the update ratio or the rank check they are taken every step), dead
# units and the gradient norms at parameter-free modules, which no finding needs every
# step. Other steps store NaN (unknown).
ZERO_COUNT_EVERY = 10

# Modules whose output is exactly zero wherever the unit is inactive (LeakyReLU, GELU, ...
# never are): their units are counted as dead when zero for the whole batch.
DEAD_UNIT_MODULES = (nn.ReLU, nn.ReLU6)

# Modules whose output is finite wherever their input is (|f(x)| <= max(|x|, 1)). Applied
# to the output whose finiteness was known last, unchanged since, they cannot be the first
# non-finite output, so their own sum is skipped (a kernel and its Python per activation).
BOUNDED_MODULES = (
    nn.ReLU,
    nn.Hardtanh,  # and ReLU6
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.Softsign,
    nn.Identity,
)


# Floating dtypes that reduce straight into a float32 slot; others (float64, complex) reduce
# in their own precision first.
_WIDEN_TO_FLOAT32 = (torch.float16, torch.bfloat16, torch.float32)


def sum_into(tensor: torch.Tensor, slot: torch.Tensor) -> None:
    """The tensor's sum in float32: NaN or Inf anywhere makes it non-finite.

    A float64 sum is taken in float64 and stored as `sum - sum` (0, or NaN when it is not
    finite): narrowed to float32, a finite sum beyond 3.4e38 would read as Inf.
    """
    if tensor.dtype in _WIDEN_TO_FLOAT32:
        torch.sum(tensor, dim=tuple(range(tensor.dim())), dtype=torch.float32, out=slot)
    else:
        total = torch.sum(tensor)
        slot.copy_(total - total)


def norm_into(tensor: torch.Tensor, slot: torch.Tensor) -> None:
    """The tensor's L2 norm (of absolute values for complex), stored as float32.

    `vector_norm(..., dtype=float32)` refuses float64 (narrowing) and complex input, so
    those are reduced in their own precision and then narrowed (a complex norm is real).
    """
    if tensor.dtype in _WIDEN_TO_FLOAT32:
        torch.linalg.vector_norm(tensor, dtype=torch.float32, out=slot)
    else:
        slot.copy_(torch.linalg.vector_norm(tensor))


# Values per unit (batch × positions) below which a unit that is zero everywhere is no
# evidence: with one sample, half of a freshly initialised ReLU's units are.
MIN_SAMPLES_PER_UNIT = 8


def unit_dim(tensor: torch.Tensor) -> int:
    """The dimension that indexes units: features of (batch, sequence, features) outputs,
    channels (dim 1) of everything else ((batch, features), (batch, channels, H, W), ...)."""
    return 2 if tensor.dim() == 3 else 1


def dead_units_into(tensor: torch.Tensor, slot: torch.Tensor) -> None:
    """How many units are exactly zero for the whole batch (a ReLU's output is never < 0)."""
    keep = unit_dim(tensor)
    peak = torch.amax(tensor, dim=[d for d in range(tensor.dim()) if d != keep])
    torch.sum(peak == 0, dim=0, dtype=torch.float32, out=slot)


class OutputSums:
    """One float32 per module (by default its output's sum) in device slots.

    NOTE [no extra peak memory]: a fresh 0-d tensor per module would hold one allocator block
    (512 bytes) per module from forward until the step, through backward, where the peak
    usually is. Slots come in chunks of SLOTS_PER_CHUNK per device, allocated once per
    session and reused every step (stream order keeps last step's copy safe).
    """

    SLOTS_PER_CHUNK = 128

    def __init__(self, reduce: Callable[[torch.Tensor, torch.Tensor], None] = sum_into) -> None:
        self._reduce = reduce
        self._slots: dict[torch.device, list[torch.Tensor]] = {}
        self._used: dict[torch.device, int] = {}
        self._names: list[str] = []
        self._seen: set[str] = set()
        self._views: list[torch.Tensor] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        device = tensor.device
        slots = self._slots.setdefault(device, [])
        used = self._used.get(device, 0)
        if used == len(slots):
            chunk = torch.empty(self.SLOTS_PER_CHUNK, dtype=torch.float32, device=device)
            slots.extend(chunk.unbind())
        slot = slots[used]
        self._used[device] = used + 1
        self._reduce(_torch_compat.local_shard(tensor), slot)
        self._names.append(name)
        self._seen.add(name)
        self._views.append(slot)

    @property
    def reduce(self) -> Callable[[torch.Tensor, torch.Tensor], None]:
        """What each module's slot holds: `sum_into` (output sums), `norm_into`, ..."""
        return self._reduce

    def __contains__(self, name: str) -> bool:
        return name in self._seen

    def take(self) -> tuple[list[str], list[torch.Tensor]]:
        """This step's names and slot views, in completion order; slots free for reuse."""
        names, views = self._names, self._views
        self._names, self._views, self._used, self._seen = [], [], {}, set()
        return names, views


class StepValues:
    """The device scalars of one recorded step, stacked for a single host read one step late.

    Every statistic `claim`s its tensors and keeps the slice it gets back; once the values
    are read, it decodes that slice and nothing else (NOTE [one read, no cursor]).
    """

    __slots__ = ("tensors",)

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []

    def claim(self, tensors: Sequence[torch.Tensor]) -> slice:
        """Add `tensors`; where their values will be in the list read back."""
        start = len(self.tensors)
        self.tensors.extend(tensors)
        return slice(start, len(self.tensors))


class ParamColumn:
    """One `ParamStat` field (`field`) for each parameter with a gradient, in step order,
    claimed in the step's values on a step that takes it. A field without a column on a
    step is NaN there (unknown)."""

    __slots__ = ("_at", "field")

    def __init__(self, field: str, values: StepValues, tensors: Sequence[torch.Tensor]) -> None:
        self.field = field
        self._at = values.claim(tensors)

    def read(self, read: list[float]) -> list[float]:
        return read[self._at]


class ZeroFractions(ParamColumn):
    """The share of each gradient that is exactly zero, from its non-zero count on device."""

    __slots__ = ("_numels",)

    def __init__(
        self, values: StepValues, nonzero: Sequence[torch.Tensor], numels: list[int]
    ) -> None:
        super().__init__("zero_fraction", values, nonzero)
        self._numels = numels

    def read(self, read: list[float]) -> list[float]:
        return [
            1.0 - nonzero / max(numel, 1)
            for nonzero, numel in zip(read[self._at], self._numels, strict=True)
        ]


class ParamsBefore:
    """A device copy of the stepped parameters from before the optimizer step (the opt-in
    memory cost of update_ratio), until `update_norms` reduces ‖p_after - p_before‖ per
    parameter once the optimizer has updated them; the copy is freed right then."""

    __slots__ = ("_before", "_params")

    def __init__(self, params: list[torch.Tensor]) -> None:
        self._params = params
        with own_ops(*params):
            self._before = _torch_compat.foreach_copy(params)

    def update_norms(self, values: StepValues) -> ParamColumn:
        params, before = self._params, self._before
        self._params = self._before = []
        with own_ops(*params):
            _torch_compat.foreach_sub_(before, params)
            return ParamColumn("update_norm", values, _torch_compat.foreach_norm(before, 2))


class _ModuleValues:
    """One device value per module, from an `OutputSums` handed over at the step."""

    __slots__ = ("_at", "_names")

    def __init__(self, values: StepValues, sums: OutputSums) -> None:
        self._names, tensors = sums.take()
        self._at = values.claim(tensors)

    def _pairs(self, read: list[float]) -> zip[tuple[str, float]]:
        return zip(self._names, read[self._at], strict=True)


class NonfiniteOutputs(_ModuleValues):
    """Modules whose output sum is NaN or Inf, in forward order."""

    __slots__ = ()

    def read(self, read: list[float]) -> tuple[str, ...]:
        return tuple(name for name, total in self._pairs(read) if not math.isfinite(total))


class OutputGradNorms(_ModuleValues):
    """(module, L2 norm of the gradient at its output) for parameter-free modules."""

    __slots__ = ()

    def read(self, read: list[float]) -> tuple[tuple[str, float], ...]:
        return tuple(self._pairs(read))


class DeadUnits(_ModuleValues):
    """(module, units zero for the whole batch, units) for ReLU-like modules."""

    __slots__ = ("_units",)

    def __init__(self, values: StepValues, sums: OutputSums, units: dict[str, int]) -> None:
        super().__init__(values, sums)
        self._units = units

    def read(self, read: list[float]) -> tuple[tuple[str, int, int], ...]:
        return tuple((name, int(count), self._units[name]) for name, count in self._pairs(read))


class Clips:
    """The `clip_grad_norm_` calls since the previous step: each one's total norm, and its
    `max_norm` where that is a tensor (read with the values, never on the host now)."""

    __slots__ = ("_at", "_norm_types")

    def __init__(
        self, values: StepValues, clips: list[tuple[torch.Tensor, float | torch.Tensor, float]]
    ) -> None:
        tensors: list[torch.Tensor] = []
        # Per call: max_norm, or None when it is a tensor read after the norm; norm_type.
        self._norm_types: list[tuple[float | None, float]] = []
        for norm, max_norm, norm_type in clips:
            tensors.append(norm)
            if isinstance(max_norm, torch.Tensor):
                tensors.append(max_norm)
                self._norm_types.append((None, float(norm_type)))
            else:
                self._norm_types.append((float(max_norm), float(norm_type)))
        self._at = values.claim(tensors)

    def read(self, read: list[float]) -> tuple[ClipCall, ...]:
        numbers = iter(read[self._at])
        calls = []
        for max_norm, norm_type in self._norm_types:
            before = next(numbers)
            calls.append(
                ClipCall(before, next(numbers) if max_norm is None else max_norm, norm_type)
            )
        return tuple(calls)


# ParamStat fields known on the host at the step; the others come from ParamColumns.
_HOST_FIELDS = ("name", "module", "numel", "arrival")
_PARAM_FIELDS = tuple(field.name for field in dataclasses.fields(ParamStat))


@dataclass(slots=True)
class _StepRecord:
    """One recorded step: its host facts, and the units that decode its device values."""

    step: int
    optimizer: str
    # The _HOST_FIELDS of each parameter with a gradient, in step order.
    params: list[tuple[str, str, int, int]]
    # One per statistic this step took, in any order.
    columns: list[ParamColumn]
    missing: tuple[tuple[str, str], ...]
    cut: tuple[str, ...]
    new_sites: tuple[tuple[str, SourceLine | None], ...]
    nonfinite_outputs: NonfiniteOutputs
    output_grad_norms: OutputGradNorms
    dead_units: DeadUnits
    clips: Clips

    def stats(self, read: list[float]) -> StepGradStats:
        by_field = {column.field: column.read(read) for column in self.columns}
        host = zip(*self.params, strict=True) if self.params else [()] * len(_HOST_FIELDS)
        by_field.update(zip(_HOST_FIELDS, host, strict=True))
        unknown = [math.nan] * len(self.params)  # a statistic this step did not take
        # Positional, in field order: one ParamStat per parameter and step adds up.
        rows = zip(*(by_field.get(name, unknown) for name in _PARAM_FIELDS), strict=True)
        return StepGradStats(
            step=self.step,
            optimizer=self.optimizer,
            params=tuple(itertools.starmap(ParamStat, rows)),
            missing=self.missing,
            nonfinite_outputs=self.nonfinite_outputs.read(read),
            cut=self.cut,
            new_sites=self.new_sites,
            output_grad_norms=self.output_grad_norms.read(read),
            dead_units=self.dead_units.read(read),
            clips=self.clips.read(read),
        )


class GradHistograms(Protocol):
    """What counts gradient histograms on the steps it wants (the session wires one in)."""

    def due(self, step: int) -> bool: ...

    def count(self, step: int, names: list[str], grads: list[torch.Tensor]) -> None: ...


# (step, optimizer, parameter names, gradient norms, parameter norms): the rank check's
# entry, with -1 for a parameter that has no gradient on this rank.
CompareRanks = Callable[[int, str, list[str], list[torch.Tensor], list[torch.Tensor]], None]
# Takes every sharded parameter seen so far (name -> ranks holding each element, see
# `_torch_compat.shard_replicas`) whenever one is seen for the first time.
NoteShards = Callable[[dict[str, int]], None]


class GradStatsProbe(GuardedProbe):
    def __init__(
        self,
        modules: ModuleStackProbe,
        steps: StepProbe,
        callers: CallerFinder,
        queue: DeferredQueue,
        on_stats: Callable[[StepGradStats], None],
        *,
        every: int = 1,
        compare_ranks: CompareRanks | None = None,
        histograms: GradHistograms | None = None,
        update_ratio: bool = False,
        on_shards: NoteShards | None = None,
        guard: ProbeGuard | None = None,
    ) -> None:
        self._guard = guard or ProbeGuard("gradient statistics", step=lambda: steps.step)
        self._modules = modules
        self._on_shards = on_shards
        # Sharded (DTensor) parameters by name -> ranks holding each element.
        self._shards: dict[str, int] = {}
        self._compare_ranks_to = compare_ranks
        self._histograms = histograms
        self._steps = steps
        self._callers = callers
        self._queue = queue
        self._on_stats = on_stats
        # Hands on each step's record once its values are read, on the store thread.
        self._deliver = self._guard(self._deliver_record)
        self._every = max(1, every)
        self._update_ratio = update_ratio
        self._arrival = itertools.count()
        self._arrived: dict[int, int] = {}
        # id(optimizer) -> its recorded step in progress, while update_ratio waits for it.
        self._stepping: dict[int, tuple[StepValues, _StepRecord, ParamsBefore]] = {}
        # (total norm, max_norm, norm_type) of clip_grad_norm_ calls since the last step.
        self._clips: list[tuple[torch.Tensor, float | torch.Tensor, float]] = []
        # id(parameter) -> weakref, for parameters whose arrival hook is installed.
        self._hooked: dict[int, weakref.ref[torch.Tensor]] = {}
        self._stack: ExitStack | None = None
        # Each module's output sum, first call per step, in completion order; bounded by the
        # module count, so a step that never comes (AMP skips) cannot grow it.
        self._outputs = OutputSums()
        # L2 norm of the gradient arriving at each parameter-free module's output (sampled
        # steps).
        self._output_grads = OutputSums(norm_into)
        # Units of ReLU-like modules' outputs that are zero for the whole batch, on sampled
        # steps, and how many units each has.
        self._dead = OutputSums(dead_units_into)
        self._units: dict[str, int] = {}
        self._parameter_free: ByModule[bool] = ByModule()
        self._installed = False
        self._cut: dict[str, None] = {}
        # The last module output whose finiteness is known (summed, or a bounded function of
        # a summed one), and its version then.
        self._known: weakref.ref[torch.Tensor] | None = None
        self._known_version = -1
        self._seen: set[str] = set()
        self._new_sites: list[tuple[str, Caller | None]] = []
        # Called by the clipping and AMP probes: failures there are this probe's.
        self.note_clip = self._guard(self.note_clip)  # type: ignore[method-assign]
        self.end_iteration = self._guard(self.end_iteration)  # type: ignore[method-assign]

    def _install(self, stack: ExitStack) -> None:
        self._stack = stack
        self._installed = True
        stack.callback(setattr, self, "_installed", False)
        guard = self._guard
        self._steps.on_grads_ready(guard(self._before_step))
        self._steps.on_updated(guard(self._after_update))
        stack.callback(self._stepping.clear)
        stack.enter_context(register_module_forward_hook(guard(self._after_forward)))

    def _recording(self) -> bool:
        return self._steps.step % self._every == 0

    def _sampled(self) -> bool:
        """Recorded steps that also take parameter norms, zero counts, dead units and
        gradients at parameter-free modules: every ZERO_COUNT_EVERY-th recorded step."""
        step = self._steps.step
        return step % self._every == 0 and (step // self._every) % ZERO_COUNT_EVERY == 0

    def note_clip(
        self, total_norm: torch.Tensor, max_norm: float | torch.Tensor, norm_type: float
    ) -> None:
        """A `clip_grad_norm_` call returned `total_norm`; it is read with the next step.

        Not where backward passes count the steps: their gradients are recorded as each pass
        ends, before the loop clips them, so a clip call belongs to no recorded gradient.
        """
        if self._installed and self._recording() and self._steps.counted_by != BY_BACKWARD:
            self._clips.append((total_norm, max_norm, norm_type))

    def _after_forward(self, module: nn.Module, args: object, output: object) -> None:
        if _torch_compat.compiling() or not torch.is_grad_enabled() or not self._recording():
            return
        tensor = _first_tensor(output)
        if tensor is None:
            return
        name = self._modules.name_of(module)
        if name not in self._seen:
            self._seen.add(name)
            self._new_sites.append((name, self._site_of(module)))
        in_graph = tensor.grad_fn is not None
        if not in_graph and any(p.requires_grad for p in module.parameters()):
            self._cut.setdefault(name)
        if name not in self._outputs and tensor.is_floating_point():
            self._check_finite(module, name, args, tensor)
        if self._sampled():
            self._sample_units(module, name, tensor, in_graph=in_graph)

    def _check_finite(
        self, module: nn.Module, name: str, args: object, tensor: torch.Tensor
    ) -> None:
        """Sum the output into its slot, unless its finiteness is already known."""
        known = None if self._known is None else self._known()
        if known is None or not (
            self._unchanged(known, tensor) or self._bounded_of(module, args, known, tensor)
        ):
            with own_ops(tensor):
                self._outputs.add(name, tensor)
        self._known = weakref.ref(tensor)
        self._known_version = tensor._version

    def _unchanged(self, known: torch.Tensor, tensor: torch.Tensor) -> bool:
        """The tensor known last, not written since: a container returning a child's output."""
        return tensor is known and tensor._version == self._known_version

    def _bounded_of(
        self, module: nn.Module, args: object, known: torch.Tensor, tensor: torch.Tensor
    ) -> bool:
        """A bounded module applied to the tensor known last (ReLU after a Linear), not
        written since; in place, the activation's own write is the one bump allowed."""
        return (
            isinstance(module, BOUNDED_MODULES)
            and isinstance(args, tuple)
            and bool(args)
            and args[0] is known
            and known._version == self._known_version + (tensor is known)
        )

    def _sample_units(
        self, module: nn.Module, name: str, tensor: torch.Tensor, *, in_graph: bool
    ) -> None:
        """On sampled steps: dead units of ReLU-like modules, gradients at parameter-free ones."""
        if isinstance(module, DEAD_UNIT_MODULES) and name not in self._dead:
            self._count_dead_units(name, tensor)
        if in_graph and self._is_parameter_free(module):
            # A tensor hook that returns None observes the gradient without changing it;
            # it goes away with the tensor, which is why a leaf (a parameter passed through
            # nn.Identity, say) gets none: its hooks would pile up step after step. (Never a
            # module backward hook: see modules.py.)
            tensor.register_hook(self._guard(functools.partial(self._output_grad_arrived, name)))

    def _count_dead_units(self, name: str, tensor: torch.Tensor) -> None:
        """Only reads the output, so ReLU(inplace=True) is as safe as any other module.

        A unit is judged only on at least MIN_SAMPLES_PER_UNIT values: about half of a
        ReLU's units are zero for any one sample (a policy called on one observation), which
        says nothing about their dying.
        """
        if tensor.dim() < 2 or not tensor.is_floating_point() or tensor.numel() == 0:
            return
        if tensor.numel() < MIN_SAMPLES_PER_UNIT * tensor.shape[unit_dim(tensor)]:
            return
        with own_ops(tensor):
            self._dead.add(name, tensor)
        self._units[name] = tensor.shape[unit_dim(tensor)]

    def _is_parameter_free(self, module: nn.Module) -> bool:
        known = self._parameter_free.get(module)
        if known is None:
            known = self._parameter_free[module] = next(module.parameters(), None) is None
        return known

    def _output_grad_arrived(self, name: str, grad: torch.Tensor) -> None:
        if self._installed and name not in self._output_grads:
            with own_ops(grad):
                self._output_grads.add(name, grad)

    def _site_of(self, module: nn.Module) -> Caller | None:
        """The user's `forward` of this module if it has one, else the line that called it."""
        code = getattr(type(module).forward, "__code__", None)
        if code is not None and is_user_code(code):
            return code, code.co_firstlineno
        return self._callers.caller()

    def _before_step(self, optimizer: Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self._hook_arrivals(params)
        self._stepping.pop(id(optimizer), None)  # left by a step of it that raised
        self._record(f"{type(optimizer).__name__}.step", params, waits=optimizer)

    def record_backward(self, params: list[torch.Tensor]) -> None:
        """Record the step a finished backward pass ends, when no optimizer steps: the
        gradients of `params` (those the pass reached) are final now."""
        self._hook_arrivals(params)
        self._record(BACKWARD_LABEL, params, waits=None)

    def _record(self, label: str, params: list[torch.Tensor], *, waits: Optimizer | None) -> None:
        """Gather a recorded step's statistics; with `waits`, the update ratio waits for
        that optimizer to update the parameters."""
        if not self._recording():
            self._forget_step()
            return
        with_grad = [p for p in params if p.grad is not None and p.grad.layout is torch.strided]
        local, grads = self._local_parts(with_grad)
        histograms = self._histograms
        if histograms is not None and histograms.due(self._steps.step):
            names = [self._param_name(p) for p in with_grad]
            histograms.count(self._steps.step, names, grads)
        values = StepValues()
        record = self._gather(values, label, params, with_grad, local, grads)
        if self._update_ratio and with_grad and waits is not None:
            self._stepping[id(waits)] = (values, record, ParamsBefore(local))
        else:
            self._push(values, record)

    def _local_parts(
        self, with_grad: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(parameters, gradients) as this rank holds them: a DTensor's local shard.

        NOTE [shards without communication]: a norm of a DTensor would all-reduce across
        ranks (and `_foreach_norm` refuses DTensors). Each rank measures its own shards
        instead; the merged report combines the ranks' sums of squares into the full
        parameter's norm (`store/shards.py`), told which parameters are shards.
        """
        grads = [p.grad for p in with_grad]
        dtensor = _torch_compat.dtensor_type()
        if dtensor is None or not any(isinstance(p, dtensor) for p in with_grad):
            return with_grad, grads  # type: ignore[return-value]
        new = {
            name: _torch_compat.shard_replicas(p.grad)
            for p in with_grad
            if isinstance(p.grad, dtensor) and (name := self._param_name(p)) not in self._shards
        }
        if new:
            self._shards.update(new)
            if self._on_shards is not None:
                self._on_shards(dict(self._shards))
        with own_ops():
            local = [_torch_compat.local_shard(p) for p in with_grad]
            return local, [_torch_compat.local_shard(g) for g in grads]  # type: ignore[arg-type]

    def _after_update(self, optimizer: Optimizer) -> None:
        """Update norms of a step that waits for them; the copies are freed when this returns."""
        stepping = self._stepping.pop(id(optimizer), None)
        if stepping is None:
            return
        values, record, before = stepping
        record.columns.append(before.update_norms(values))
        self._push(values, record)

    def _push(self, values: StepValues, record: _StepRecord) -> None:
        on_ready = functools.partial(self._deliver, record)
        if values.tensors:
            self._queue.push(stack_scalars(values.tensors), on_ready)
        else:
            on_ready([])

    def _deliver_record(self, record: _StepRecord, read: list[float]) -> None:
        self._on_stats(record.stats(read))

    def _gather(
        self,
        values: StepValues,
        label: str,
        params: list[torch.Tensor],
        with_grad: list[torch.Tensor],
        local: list[torch.Tensor],
        grads: list[torch.Tensor],
    ) -> _StepRecord:
        """The step's host facts, and its statistics, whose device values go into `values`.

        `local` and `grads` are `with_grad` and their gradients as this rank holds them
        (NOTE [shards without communication]); numbers are this rank's.
        """
        step = self._steps.step
        # Usually every parameter has a gradient: no second pass over them to find none.
        missing = (
            tuple([self._describe(p) for p in params if p.requires_grad and p.grad is None])
            if len(with_grad) < len(params)
            else ()
        )
        arrived = self._arrived
        entry = self._modules.parameter_entry  # what _describe does, one call less per parameter
        described = [
            (*(entry(p) or _unnamed(p)), t.numel(), arrived.get(id(p), -1))
            for p, t in zip(with_grad, local, strict=True)
        ]
        count_zeros = self._sampled()
        # Weights move slowly: their norms come with the sampled steps, unless the update
        # ratio or the rank check needs them at every recorded step.
        weigh = count_zeros or self._update_ratio or self._compare_ranks_to is not None
        columns: list[ParamColumn] = []
        grad_l2: list[torch.Tensor] = []
        param_l2: list[torch.Tensor] = []
        if with_grad:
            with own_ops(*grads, *local):
                grad_l2 = _torch_compat.foreach_norm(grads, 2)
                columns.append(ParamColumn("grad_norm", values, grad_l2))
                if weigh:
                    param_l2 = _torch_compat.foreach_norm(local, 2)
                    columns.append(ParamColumn("param_norm", values, param_l2))
                if count_zeros:
                    nonzero = _torch_compat.foreach_norm(grads, 0)
                    numels = [numel for _, _, numel, _ in described]
                    columns.append(ZeroFractions(values, nonzero, numels))
        units, self._units = self._units, {}
        clips, self._clips = self._clips, []
        record = _StepRecord(
            step=step,
            optimizer=label,
            params=described,
            columns=columns,
            missing=missing,
            cut=tuple(self._cut),
            new_sites=tuple((name, source_line(site)) for name, site in self._new_sites),
            nonfinite_outputs=NonfiniteOutputs(values, self._outputs),
            output_grad_norms=OutputGradNorms(values, self._output_grads),
            dead_units=DeadUnits(values, self._dead, units),
            clips=Clips(values, clips),
        )
        self._cut = {}
        self._new_sites.clear()
        self._arrived.clear()
        self._arrival = itertools.count()
        if self._compare_ranks_to is not None and params:
            self._compare_ranks(step, record.optimizer, params, with_grad, grad_l2, param_l2)
        return record

    def _compare_ranks(
        self,
        step: int,
        label: str,
        params: list[torch.Tensor],
        with_grad: list[torch.Tensor],
        grad_l2: list[torch.Tensor],
        param_l2: list[torch.Tensor],
    ) -> None:
        """Hand every parameter's norms to the rank check, -1 where a gradient is missing.

        Over all of the optimizer's parameters, not just those with a gradient this step, so
        every rank contributes a table of the same shape even when one rank lost a gradient.
        Sharded parameters are left out: each rank holds different shards of them.
        """
        assert self._compare_ranks_to is not None
        if self._shards:
            params = [p for p in params if self._param_name(p) not in self._shards]
            if not params:
                return
        computed = {id(p): i for i, p in enumerate(with_grad)}
        with own_ops():
            absent = torch.full((), -1.0, device=params[0].device)
        grads = [grad_l2[computed[id(p)]] if id(p) in computed else absent for p in params]
        norms = [param_l2[computed[id(p)]] if id(p) in computed else absent for p in params]
        names = [self._param_name(p) for p in params]
        self._compare_ranks_to(step, label, names, grads, norms)

    def end_iteration(self) -> None:
        """Forget forward facts of an iteration whose step was skipped (GradScaler)."""
        self._forget_step()

    def _forget_step(self) -> None:
        self._outputs.take()
        self._output_grads.take()
        self._dead.take()
        self._units.clear()
        self._clips.clear()
        self._cut.clear()
        self._arrived.clear()

    def _hook_arrivals(self, params: list[torch.Tensor]) -> None:
        stack = self._stack
        if stack is None:
            return
        for p in params:
            known = self._hooked.get(id(p))
            if p.requires_grad and (known is None or known() is not p):
                self._hooked[id(p)] = weakref.ref(p)
                stack.enter_context(
                    p.register_post_accumulate_grad_hook(self._guard(self._arrived_hook))
                )

    def _arrived_hook(self, param: torch.Tensor) -> None:
        self._arrived.setdefault(id(param), next(self._arrival))

    def _param_name(self, param: torch.Tensor) -> str:
        return self._describe(param)[0]

    def _describe(self, param: torch.Tensor) -> tuple[str, str]:
        """(name, owning module) of a parameter, in one lookup."""
        return self._modules.parameter_entry(param) or _unnamed(param)


def _unnamed(param: torch.Tensor) -> tuple[str, str]:
    """(name, owning module) of a parameter outside every named module."""
    return f"<unnamed {tuple(param.shape)}>", "?"


def _first_tensor(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None
