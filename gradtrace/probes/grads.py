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

import functools
import itertools
import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook
from torch.optim import Optimizer

from gradtrace.events import ClipCall, ParamStat, StepGradStats
from gradtrace.probes import _torch_compat
from gradtrace.probes.deferred import DeferredQueue, stack_scalars
from gradtrace.probes.frames import Caller, CallerFinder, is_user_code, source_line
from gradtrace.probes.guard import ProbeGuard
from gradtrace.probes.histograms import GradHistogramProbe
from gradtrace.probes.modules import ByModule, ModuleStackProbe
from gradtrace.probes.own_ops import own_ops
from gradtrace.probes.rank_check import RankCheckProbe
from gradtrace.probes.steps import StepProbe

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
        self._reduce(tensor, slot)
        self._names.append(name)
        self._seen.add(name)
        self._views.append(slot)

    def __contains__(self, name: str) -> bool:
        return name in self._seen

    def take(self) -> tuple[list[str], list[torch.Tensor]]:
        """This step's names and slot views, in completion order; slots free for reuse."""
        names, views = self._names, self._views
        self._names, self._views, self._used, self._seen = [], [], {}, set()
        return names, views


@dataclass
class _Stepping:
    """A recorded step whose optimizer is updating: its values wait for the update norms."""

    params: list[torch.Tensor]
    # Copies of `params` from before the update: the opt-in memory cost of update_ratio.
    before: list[torch.Tensor]
    values: list[torch.Tensor]
    on_ready: Callable[[list[float]], None]


class GradStatsProbe:
    def __init__(
        self,
        modules: ModuleStackProbe,
        steps: StepProbe,
        callers: CallerFinder,
        queue: DeferredQueue,
        on_stats: Callable[[StepGradStats], None],
        *,
        every: int = 1,
        ranks: RankCheckProbe | None = None,
        histograms: GradHistogramProbe | None = None,
        update_ratio: bool = False,
        guard: ProbeGuard | None = None,
    ) -> None:
        self._guard = guard or ProbeGuard("gradient statistics", step=lambda: steps.step)
        self._modules = modules
        self._ranks = ranks
        self._histograms = histograms
        self._steps = steps
        self._callers = callers
        self._queue = queue
        self._on_stats = on_stats
        self._every = max(1, every)
        self._update_ratio = update_ratio
        self._arrival = itertools.count()
        self._arrived: dict[int, int] = {}
        # id(optimizer) -> its recorded step in progress, while update_ratio waits for it.
        self._stepping: dict[int, _Stepping] = {}
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

    def install(self, stack: ExitStack) -> None:
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
        """A `clip_grad_norm_` call returned `total_norm`; it is read with the next step."""
        if self._installed and self._recording():
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
        """Only reads the output, so ReLU(inplace=True) is as safe as any other module."""
        if tensor.dim() < 2 or not tensor.is_floating_point() or tensor.numel() == 0:
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
        if not self._recording():
            self._forget_step()
            return
        with_grad = [p for p in params if p.grad is not None and p.grad.layout is torch.strided]
        histograms = self._histograms
        if histograms is not None and histograms.due(self._steps.step):
            names = [self._param_name(p) for p in with_grad]
            histograms.count(self._steps.step, names, [p.grad for p in with_grad])
        values, on_ready = self._reductions(optimizer, params, with_grad)
        if self._update_ratio and with_grad:
            with own_ops(*with_grad):
                before = _torch_compat.foreach_copy(with_grad)
            self._stepping[id(optimizer)] = _Stepping(with_grad, before, values, on_ready)
        else:
            self._push(values, on_ready)

    def _after_update(self, optimizer: Optimizer) -> None:
        """‖p_after - p_before‖ per parameter; the copies are freed when this returns."""
        stepping = self._stepping.pop(id(optimizer), None)
        if stepping is None:
            return
        with own_ops(*stepping.params):
            _torch_compat.foreach_sub_(stepping.before, stepping.params)
            update_norms = _torch_compat.foreach_norm(stepping.before, 2)
        self._push(stepping.values + update_norms, stepping.on_ready)

    def _push(self, values: list[torch.Tensor], on_ready: Callable[[list[float]], None]) -> None:
        on_ready = self._guard(on_ready)  # runs on the store thread, later
        if values:
            self._queue.push(stack_scalars(values), on_ready)
        else:
            on_ready([])

    def _reductions(
        self, optimizer: Optimizer, params: list[torch.Tensor], with_grad: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], Callable[[list[float]], None]]:
        """The step's device values, and what turns them, once read, into a record.

        Read back in this order: gradient norms, parameter norms (sampled steps, or every
        step with the update ratio or the rank check), non-zero counts (sampled steps),
        output sums, output-gradient norms and dead units (sampled steps), clip norms (and
        tensor max_norms), then update norms when `_after_update` appended them.
        """
        step = self._steps.step
        missing = tuple(self._describe(p) for p in params if p.requires_grad and p.grad is None)
        output_names, output_sums = self._outputs.take()
        grad_names, grad_norms = self._output_grads.take()
        dead_names, dead_counts = self._dead.take()
        units, self._units = self._units, {}
        clips, self._clips = self._clips, []
        count_zeros = self._sampled()
        # Weights move slowly: their norms come with the sampled steps, unless the update
        # ratio or the rank check needs them at every recorded step.
        weigh = count_zeros or self._update_ratio or self._ranks is not None
        values: list[torch.Tensor] = []
        grad_l2: list[torch.Tensor] = []
        param_l2: list[torch.Tensor] = []
        if with_grad:
            grads = [p.grad for p in with_grad]
            with own_ops(*grads, *with_grad):
                grad_l2 = _torch_compat.foreach_norm(grads, 2)
                if weigh:
                    param_l2 = _torch_compat.foreach_norm(with_grad, 2)
                values += grad_l2 + param_l2
                if count_zeros:
                    values += _torch_compat.foreach_norm(grads, 0)
        values += output_sums
        values += grad_norms
        values += dead_counts
        values += [norm for norm, _, _ in clips]
        values += [m for _, m, _ in clips if isinstance(m, torch.Tensor)]
        # (max_norm, or None when it is a tensor read with the values; norm_type) per call.
        clip_args = [
            (None if isinstance(m, torch.Tensor) else float(m), float(norm_type))
            for _, m, norm_type in clips
        ]
        arrived = self._arrived
        described = [(*self._describe(p), p.numel(), arrived.get(id(p), -1)) for p in with_grad]
        cut, self._cut = tuple(self._cut), {}
        new_sites = tuple((name, source_line(site)) for name, site in self._new_sites)
        self._new_sites.clear()
        self._arrived.clear()
        self._arrival = itertools.count()
        label = f"{type(optimizer).__name__}.step"
        if self._ranks is not None and params:
            self._compare_ranks(step, label, params, with_grad, grad_l2, param_l2)

        def on_ready(read: list[float]) -> None:
            n = len(described)
            cursor = iter(read)
            grad = _take(cursor, n)
            norm = _take(cursor, n) if weigh else [math.nan] * n
            nonzero = _take(cursor, n) if count_zeros else [math.nan] * n
            finite = _take(cursor, len(output_names))
            output_grads = _take(cursor, len(grad_names))
            dead = _take(cursor, len(dead_names))
            clip_norms = _take(cursor, len(clip_args))
            tensor_maxes = iter(_take(cursor, sum(m is None for m, _ in clip_args)))
            updates = _take(cursor, n) or [math.nan] * n
            self._on_stats(
                StepGradStats(
                    step=step,
                    optimizer=label,
                    params=tuple(
                        ParamStat(name, module, numel, g, p, 1.0 - nz / max(numel, 1), a, u)
                        for (name, module, numel, a), g, p, nz, u in zip(
                            described, grad, norm, nonzero, updates, strict=True
                        )
                    ),
                    missing=missing,
                    nonfinite_outputs=tuple(
                        name
                        for name, value in zip(output_names, finite, strict=True)
                        if not math.isfinite(value)
                    ),
                    cut=cut,
                    new_sites=new_sites,
                    output_grad_norms=tuple(zip(grad_names, output_grads, strict=True)),
                    dead_units=tuple(
                        (name, int(count), units[name])
                        for name, count in zip(dead_names, dead, strict=True)
                    ),
                    clips=tuple(
                        ClipCall(before, next(tensor_maxes) if m is None else m, norm_type)
                        for before, (m, norm_type) in zip(clip_norms, clip_args, strict=True)
                    ),
                )
            )

        return values, on_ready

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
        """
        assert self._ranks is not None
        computed = {id(p): i for i, p in enumerate(with_grad)}
        with own_ops():
            absent = torch.full((), -1.0, device=params[0].device)
        grads = [grad_l2[computed[id(p)]] if id(p) in computed else absent for p in params]
        norms = [param_l2[computed[id(p)]] if id(p) in computed else absent for p in params]
        names = [self._param_name(p) for p in params]
        self._ranks.compare(step, label, names, grads, norms)

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
        entry = self._modules.parameter_entry(param)
        if entry is None:
            return f"<unnamed {tuple(param.shape)}>", "?"
        return entry


def _take(cursor: Iterator[float], n: int) -> list[float]:
    return list(itertools.islice(cursor, n))


def _first_tensor(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None
