"""Every private torch API gradtrace touches, each behind one named function.

NOTE [checked versions]: the calls below were checked on torch 2.13.0 (CPU) and 2.11 (CUDA).
If a future torch renames one, only this module changes.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradtrace.errors import GradtraceError

MIN_TORCH = (2, 2)


def check_supported() -> None:
    """Refuse a torch older than the hooks gradtrace needs, with a one-line reason."""
    release = torch.__version__.split("+")[0].split(".")
    try:
        version = (int(release[0]), int(release[1]))
    except (IndexError, ValueError):
        return
    if version < MIN_TORCH:
        raise GradtraceError(
            f"gradtrace needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, found {torch.__version__}. "
            "Upgrade torch in this environment."
        )


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread.

    NOTE: `_current_graph_task_id` is -1 outside a graph task; it is set on the engine's
    device threads too, which is where CUDA backward runs.
    """
    return torch._C._current_graph_task_id() != -1


def checkpointing() -> str | None:
    """How activation checkpointing runs the forward in progress on this thread, if it does.

    NOTE: non-reentrant `torch.utils.checkpoint` pushes saved-tensor hooks of its own (defined
    in that module) over gradtrace's, in forward and again while recomputing; reentrant
    checkpoint runs forward under no_grad and reruns it inside backward, which is when this
    sees it. Checked on torch 2.11 and 2.13.
    """
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is not None and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint":
        return "non-reentrant"
    if in_backward():
        return "recomputed in backward"
    return None


def current_node_name() -> str | None:
    """Name of the autograd node being executed (e.g. "SigmoidBackward0"), if any.

    NOTE: during a saved tensor's unpack this is the backward node that needs the tensor,
    which is exactly the node PyTorch's own version-check error would name.
    """
    node = torch._C._current_autograd_node()
    return None if node is None else node.name()


def is_own_output(tensor: torch.Tensor) -> bool:
    """Whether a tensor being packed is an output of the node saving it (else an input).

    NOTE [outputs and inputs at pack]: autograd creates the node of an op before it saves
    the op's inputs and sets it as the outputs' grad_fn before it saves those, and each new
    node takes the next number of this thread's sequence counter. A saved tensor whose
    grad_fn is the newest node is therefore the saving node's own output. PyTorch's own
    version error words the two cases differently (`SavedVariable::unpack`). Checked on
    torch 2.13 (`torch._C._autograd._get_sequence_nr` peeks the counter).
    """
    grad_fn = tensor.grad_fn
    if grad_fn is None:
        return False
    return grad_fn._sequence_nr() == torch._C._autograd._get_sequence_nr() - 1


def version_of(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter, or None for tensors without one.

    NOTE: inference tensors raise on `_version`; they cannot be saved for backward anyway.
    """
    if tensor.is_inference():
        return None
    return tensor._version


def storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(device index, storage base address) of a tensor's memory; -1 is the CPU.

    Every view and `.data` alias of one storage has the same key. None for tensors that own
    no addressable memory: sparse and other non-strided layouts, meta tensors, and tensors
    with no data yet.

    NOTE: the base is derived from `data_ptr()` and `storage_offset()` instead of
    `untyped_storage()`, which builds a Python object per call, and the device is
    `get_device()`, an int, instead of a `torch.device`: this runs for every written tensor.
    Both read metadata only, with no device synchronisation.
    """
    if tensor.layout is not torch.strided or tensor.is_meta:
        return None
    first = tensor.data_ptr()
    if first == 0:
        return None
    return tensor.get_device(), first - tensor.storage_offset() * tensor.element_size()


class UntracedDynamoMode(TorchDispatchMode):
    """Base for dispatch modes whose `__torch_dispatch__` runs as plain Python.

    NOTE [_should_skip_dynamo]: since torch 2.9 every TorchDispatchMode subclass gets its
    `__torch_dispatch__` wrapped in `torch._disable_dynamo`, which adds two Python frames
    and eval-frame switches to every op (about 5 µs per op measured on CPU, the biggest
    single cost of the write log). The wrapper exists so Dynamo never traces into a mode;
    while any non-infra dispatch mode is active Dynamo runs frames eagerly anyway, so
    gradtrace opts out. Checked on torch 2.11 and 2.13; a torch without the hook ignores it.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


def step_aside(mode: TorchDispatchMode) -> bool:
    """Take `mode` off this thread's dispatch-mode stack if it is on top; True if it was.

    NOTE: `_pop_mode`/`_push_mode` are what `TorchDispatchMode.__enter__/__exit__` use
    (torch 2.2 to 2.13). Only the top mode is ever taken, so a user's mode entered inside
    gradtrace's is never disturbed: then nothing is taken.
    """
    from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode

    if _get_current_dispatch_mode() is not mode:
        return False
    _pop_mode()
    return True


def step_back(mode: TorchDispatchMode) -> None:
    """Put a mode `step_aside` took back on top of this thread's stack."""
    from torch.utils._python_dispatch import _push_mode

    _push_mode(mode)


# Dtypes whose norms are taken in float32; wider ones (float64, complex) keep their precision.
_NORM_IN_FLOAT32 = (torch.float16, torch.bfloat16, torch.float32)


def foreach_norm(tensors: list[torch.Tensor], ord: float) -> list[torch.Tensor]:
    """Per-tensor norms, in one batched kernel per precision where torch has one.

    Norms of float32 and narrower tensors are float32; float64 tensors get float64 norms and
    complex ones real norms of their magnitudes (`dtype=float32` refuses both: narrowing).
    NOTE: `_foreach_norm` takes `dtype=` since torch 2.6 (low-precision gradients would
    otherwise give bf16 norms); older versions get float32 copies instead.
    """
    narrow = [i for i, t in enumerate(tensors) if t.dtype in _NORM_IN_FLOAT32]
    if len(narrow) == len(tensors):
        return _float32_norms(tensors, ord)
    norms: list[torch.Tensor] = list(tensors)  # every slot replaced below
    wide = [i for i, t in enumerate(tensors) if t.dtype not in _NORM_IN_FLOAT32]
    if narrow:
        for i, norm in zip(narrow, _float32_norms([tensors[i] for i in narrow], ord), strict=True):
            norms[i] = norm
    for i, norm in zip(wide, torch._foreach_norm([tensors[i] for i in wide], ord), strict=True):
        norms[i] = norm
    return norms


def _float32_norms(tensors: list[torch.Tensor], ord: float) -> list[torch.Tensor]:
    try:
        return list(torch._foreach_norm(tensors, ord, dtype=torch.float32))
    except TypeError:
        return list(torch._foreach_norm([t.float() for t in tensors], ord))


def foreach_copy(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """New tensors holding the same values, in one batched kernel where torch has one.

    NOTE: `_foreach_mul` by 1 is bitwise exact (for -0.0 and Inf too) and allocates its
    results itself; `_foreach_copy_` would need one `empty_like` call per tensor first.
    """
    return list(torch._foreach_mul(tensors, 1.0))


def foreach_sub_(tensors: list[torch.Tensor], others: list[torch.Tensor]) -> None:
    """`tensors[i] -= others[i]` for every i, in one batched kernel where torch has one."""
    torch._foreach_sub_(tensors, others)


def grad_scaler_found_inf(scaler: object) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """(found_inf tensors of this iteration, current scale) of an enabled GradScaler.

    NOTE: GradScaler has no public hook or accessor for these; `_per_optimizer_states`,
    `found_inf_per_device`, `_scale` and `_enabled` are read exactly as `GradScaler.update`
    reads them (torch 2.2 to 2.13). None when disabled or nothing was unscaled.
    """
    if not getattr(scaler, "_enabled", False) or getattr(scaler, "_scale", None) is None:
        return None
    states = getattr(scaler, "_per_optimizer_states", {})
    found = [f for state in states.values() for f in state.get("found_inf_per_device", {}).values()]
    if not found:
        return None
    return found, scaler._scale


def version_error_message() -> str | None:
    """PyTorch's own version-check error for `sigmoid(x).add_(1)`, or None if not raised.

    NOTE: gradtrace re-raises this error itself (its hooks switch PyTorch's check off), so
    it asks torch once, before installing any hook, how this release words it. The probe is
    two CPU ops on a 1-element tensor, run with anomaly mode off so it prints nothing. It
    raises nothing when the user has saved-tensor hooks of their own installed; the default
    wording is used then.
    """
    x = torch.ones(1, requires_grad=True)
    # Anomaly mode, if the user enabled it, would print this probe's failure as a warning.
    with torch.enable_grad(), torch.autograd.set_detect_anomaly(False):
        y = x.sigmoid()
        y.add_(1)
        try:
            y.backward()
        except RuntimeError as error:
            return str(error)
    return None


def compiling() -> bool:
    """True while torch.compile traces the calling code (the caller's hook then does nothing).

    NOTE [compile and global hooks]: Dynamo inlines global module hooks into the graphs it
    compiles. Tracing gradtrace's module stack (thread-local lists, weak dictionaries of
    modules) made Dynamo fail with "already tracked for mutation" (torch 2.13, aot_eager and
    inductor). A hook that returns at once when this is True is traced as a no-op, so
    compiled regions run at full speed, untraced; `torch.compiler.is_compiling` is the
    documented way to do that.
    """
    return torch.compiler.is_compiling()


def compiled_original(module: nn.Module) -> nn.Module | None:
    """The module a `torch.compile(module)` wrapper (OptimizedModule) wraps, else None.

    NOTE: global forward hooks fire for the OptimizedModule too, and its `named_modules()`
    prefixes every path with `_orig_mod.`; gradtrace names the wrapped module instead.
    """
    original = getattr(module, "_orig_mod", None)
    return original if isinstance(original, nn.Module) else None


# Wrapper attributes that show up as path components of the user's modules.
_WRAPPER_ATTRIBUTES = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def data_parallel_original(module: nn.Module) -> nn.Module | None:
    """The model inside a DistributedDataParallel, DataParallel or (v1) FSDP wrapper, else None.

    NOTE: these wrappers call the user's model as `self.module(...)`, so their
    `named_modules()` spell every path `module.<path>` (FSDP also nests
    `_fsdp_wrapped_module.`); gradtrace names modules and parameters as in the user's model,
    which is how they appear in its code. FSDP is only looked up if the program imported it.
    """
    wrappers: list[type] = [nn.parallel.DistributedDataParallel, nn.DataParallel]
    fsdp = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    if fsdp is not None:
        wrappers.append(fsdp.FullyShardedDataParallel)
    if isinstance(module, tuple(wrappers)):
        inner = getattr(module, "module", None)
        return inner if isinstance(inner, nn.Module) else None
    return None


def unwrapped_path(path: str) -> str:
    """A `named_modules()` path without the components wrappers insert inside the model."""
    if "_" not in path:
        return path
    return ".".join(part for part in path.split(".") if part not in _WRAPPER_ATTRIBUTES)


def check_native_supported() -> None:
    """Refuse the native core on a torch it was not made for (the Python probes run instead).

    NOTE [native core and torch versions]: the core (gradtrace/_native/core.cpp) observes
    writes on `DispatchKey::TESTING_ONLY_GenericMode` (see NOTE [observer key] there) and
    reads torch's C++ headers as of 2.13; compiled code is kept eager with
    `torch.compiler.set_stance` (2.6+). Checked on torch 2.13 (CPU); a torch whose headers
    differ fails to build it, which is a fallback, never an error.
    """
    if not hasattr(torch.compiler, "set_stance"):
        raise RuntimeError(f"torch {torch.__version__} is older than 2.6")


def force_eager() -> AbstractContextManager[object]:
    """Context in which torch.compile'd code runs eagerly, op by op.

    NOTE: the native write observer sees ops at the dispatcher; code compiled by Inductor
    writes its buffers in generated kernels it never sees. `torch.compiler.set_stance`
    (torch >= 2.6, checked on 2.13) is the documented switch; on earlier releases the
    native core is not used (`check_native_supported`).
    """
    return torch.compiler.set_stance("force_eager")


def graph_task_id() -> int:
    """An id of the backward pass running on this thread (-1 outside every backward)."""
    return torch._C._current_graph_task_id()


def at_backward_end(callback: Callable[[], None]) -> None:
    """Run `callback` once the backward pass running now has finished, on its thread.

    NOTE: `Variable._execution_engine.queue_callback` is what DDP uses to act once every
    gradient of a pass is accumulated; it must be called from inside that pass (a hook).
    Checked on torch 2.11 and 2.13.
    """
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def dtensor_type() -> type | None:
    """`torch.distributed.tensor.DTensor`, or None while the program has not imported it.

    NOTE: FSDP2 (`fully_shard`) and tensor parallelism hold parameters and gradients as
    DTensors. A program that uses them has imported the module, so nothing is imported here
    (and plain programs pay one dictionary lookup per step).
    """
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's own part of a DTensor (`to_local()`: no communication), else the tensor.

    Call with grad mode off: `to_local()` then returns the local tensor itself, no view.
    """
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


def shard_replicas(tensor: torch.Tensor) -> int:
    """How many ranks hold each element of a DTensor's local shards; 0 when the shards do
    not combine into the whole by sums of squares (a `Partial` placement: pending sums).

    A `Shard` placement splits a mesh dimension's ranks over the elements; a `Replicate`
    placement gives every rank of that dimension a copy. So the full tensor's sum of squares
    is the sum over all ranks of their shard's, divided by this.
    NOTE: `placements` and `device_mesh.size(dim)` are DTensor's public API (torch >= 2.4).
    """
    replicas = 1
    for dim, placement in enumerate(tensor.placements):
        if placement.is_partial():
            return 0
        if placement.is_replicate():
            replicas *= tensor.device_mesh.size(dim)
    return replicas


# FSDP2's parameter-group methods that move parameter and gradient memory: all-gather
# (copy-in, copy-out into the unsharded parameters), resharding (storage resizes) and
# gradient reduce-scatter, and the hooks that call them.
_FSDP_GROUP_METHODS = (
    "unshard",
    "wait_for_unshard",
    "reshard",
    "pre_forward",
    "post_forward",
    "pre_backward",
    "post_backward",
    "finalize_backward",
)


def around_fsdp_internals(
    around: Callable[[], AbstractContextManager[object]],
) -> Callable[[], None] | None:
    """Run FSDP2's memory moves inside `around()`; returns the undo, or None (no FSDP2 yet).

    NOTE [FSDP2's own writes]: FSDP2 frees each unsharded parameter's storage after forward
    (`resize_(0)`) and refills it before backward with `fsdp::split_with_sizes_copy` under
    `_unsafe_preserve_version_counter`: to a write observer, a write that skips the version
    counter into memory autograd saved (`weight.t()`), which is what a silent overwrite looks
    like. Those writes are FSDP's, restore the values autograd saved, and are never the
    user's, so they run hidden like gradtrace's own. FSDP2 offers no hook around them: the
    methods of `FSDPParamGroup` that make them are wrapped (class attributes, restored by
    the undo). Nothing is imported: a program using FSDP2 has imported it. Checked on torch
    2.13 (`torch.distributed.fsdp._fully_shard._fsdp_param_group`).
    """
    module = sys.modules.get("torch.distributed.fsdp._fully_shard._fsdp_param_group")
    group = getattr(module, "FSDPParamGroup", None)
    if group is None:
        return None
    methods = vars(group)
    originals = {name: methods[name] for name in _FSDP_GROUP_METHODS if name in methods}

    def wrapped(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def run(*args: Any, **kwargs: Any) -> Any:
            with around():
                return method(*args, **kwargs)

        return run

    for name, method in originals.items():
        setattr(group, name, wrapped(method))

    def undo() -> None:
        for name, method in originals.items():
            setattr(group, name, method)

    return undo
