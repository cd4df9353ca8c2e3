"""Saved-tensor probe: remember every tensor autograd saves, check it when backward needs it.

NOTE [installing hooks disables PyTorch's version check]: `SavedVariable::unpack` compares
versions only when no saved-tensor hooks are set. With ours installed, an in-place write to
a saved tensor would silently give wrong gradients. `unpack` therefore repeats the check and
raises PyTorch's own error (same type, same wording) followed by gradtrace's attribution. It
runs exactly when the backward node needs the tensor, where PyTorch's check would have fired.

NOTE [no reference cycles]: `pack` keeps `tensor.detach()`, never an output itself: a saved
output refers to its own grad_fn, and holding it would keep a graph alive that backward never
frees. The detached tensor shares storage and version counter, so memory use is what
autograd's own saving costs. An input is also kept itself, as PyTorch keeps it without hooks
(no cycle: its grad_fn is an earlier node), because the error names its grad_fn at unpack.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable
from contextlib import ExitStack

import torch

from gradtrace.analysis.culprits import (
    Wording,
    diagnose,
    explain,
    learn_wording,
    no_grad_parameter_write,
    pytorch_message,
    untracked_activation_write,
    version_message,
)
from gradtrace.events import CorruptionEvidence, Finding, SavedTensor, WriteEvent
from gradtrace.probes import _torch_compat
from gradtrace.probes.frames import Caller, CallerFinder, source_line
from gradtrace.probes.guard import GuardedProbe, ProbeGuard, deliberate
from gradtrace.probes.modules import LOOP_OWNER, ModuleStackProbe
from gradtrace.probes.own_ops import unobserved
from gradtrace.probes.steps import StepProbe

# Writes kept per saved tensor: the first one is the culprit, a few more are context. A graph
# the user keeps alive (e.g. `losses.append(loss)`) must not make this grow every step.
MAX_HITS_PER_SAVED = 4

SpanKey = tuple[int, int]
# (first byte, sizes, strides in elements, bytes per element) of a tensor: where it lies.
Layout = tuple[int, tuple[int, ...], tuple[int, ...], int]

# Byte blocks worked out exactly per overlap check; beyond this the whole span counts.
MAX_BLOCKS = 4096


class RawWrite:
    """A write that hit saved memory, kept cheap until a finding needs it resolved."""

    __slots__ = ("caller", "op", "owner", "phase", "seq", "step")

    def __init__(
        self, seq: int, op: str, owner: str, phase: str, step: int, caller: Caller | None
    ) -> None:
        self.seq = seq
        self.op = op
        self.owner = owner
        self.phase = phase
        self.step = step
        self.caller = caller

    def resolve(self) -> WriteEvent:
        return WriteEvent(
            seq=self.seq,
            op=self.op,
            owner=self.owner,
            phase=self.phase,
            step=self.step,
            source=source_line(self.caller),
        )


class SavedRecord:
    """What gradtrace knows of one saved tensor, and the writes that hit it since.

    Shape, strides, dtype, device and storage are read off `tensor` (the detached alias
    autograd keeps) only when needed: packing runs for every saved tensor and must stay
    cheap.
    """

    __slots__ = (
        "_blocks",
        "_first",
        "_last",
        "caller",
        "grad_fn",
        "hits",
        "module",
        "original",
        "output_nr",
        "reported",
        "shared",
        "step",
        "tensor",
        "version",
    )

    def __init__(
        self,
        tensor: torch.Tensor,
        grad_fn: str | None,
        output_nr: int,
        version: int,
        module: str,
        step: int,
        caller: Caller | None,
    ) -> None:
        self.tensor = tensor
        self.grad_fn = grad_fn
        self.output_nr = output_nr
        self.version = version
        self.module = module
        self.step = step
        self.caller = caller
        self._first: int | None = None
        self._last: int | None = None
        self._blocks: list[tuple[int, int]] | None = None
        # An input the node saved, kept as PyTorch keeps it: its grad_fn at unpack is the
        # node PyTorch's error names (NOTE [outputs and inputs at pack] in _torch_compat).
        # None for the node's own output (keeping it would make a reference cycle).
        self.original: torch.Tensor | None = None
        self.hits: list[RawWrite] = []
        # Writes to other bytes of its buffer that share its version counter (see NOTE
        # [shared version counter] in analysis/culprits.py).
        self.shared: list[RawWrite] = []
        self.reported = False

    def overlaps(self, write: Layout) -> bool:
        """True if the write touches at least one byte of this saved tensor.

        NOTE [interleaved views]: the spans of two column slices of one matrix overlap
        although their elements do not: `nn.LSTMCell` and `nn.GRUCell` on CPU apply `sigmoid_`
        and `tanh_` to `unsafe_chunk`s of one gate tensor, and `x[:, 1] = 0` after `x[:, 0]` was
        saved is legal. Overlapping spans are therefore checked block by block.
        """
        first = write[0]
        last = first + _extent_bytes(write)
        if self._first is None or self._last is None:
            layout = layout_of(self.tensor)
            self._first, self._last = layout[0], layout[0] + _extent_bytes(layout)
        if not (first < self._last and self._first < last):
            return False
        if self._blocks is None:
            self._blocks = byte_blocks(layout_of(self.tensor))
        return blocks_overlap(self._blocks, byte_blocks(write))


class LiveSaved:
    """Live saved tensors by storage, so a write can ask "did I hit saved memory?" in O(1).

    Only the write log needs it. A record leaves when autograd drops the packed value (after
    backward, or when the graph is freed), so a storage address is never matched after its
    memory could be reused.
    """

    def __init__(self) -> None:
        self._by_storage: dict[SpanKey, list[SavedRecord]] = {}
        self._lock = threading.Lock()

    def add(self, key: SpanKey, record: SavedRecord) -> None:
        with self._lock:
            self._by_storage.setdefault(key, []).append(record)

    def discard(self, key: SpanKey, record: SavedRecord) -> None:
        with self._lock:
            records = self._by_storage.get(key)
            if records is None:
                return
            try:
                records.remove(record)
            except ValueError:
                return
            if not records:
                del self._by_storage[key]

    def on_storage(self, key: SpanKey) -> list[SavedRecord] | None:
        return self._by_storage.get(key)

    def __bool__(self) -> bool:
        return bool(self._by_storage)

    def count(self) -> int:
        with self._lock:
            return sum(len(records) for records in self._by_storage.values())


class _Packed:
    """What autograd keeps for a saved tensor while the write log watches its storage."""

    __slots__ = ("key", "live", "record")

    def __init__(self, record: SavedRecord, key: SpanKey, live: LiveSaved) -> None:
        self.record = record
        self.key = key
        self.live = live
        live.add(key, record)

    def __del__(self) -> None:
        self.live.discard(self.key, self.record)


class _Unwatched:
    """What the hooks keep for a saved tensor once the probe is off: its version, nothing more."""

    __slots__ = ("grad_fn", "output_nr", "tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.detach()
        self.version = _torch_compat.version_of(tensor)
        grad_fn = tensor.grad_fn
        self.grad_fn = None if grad_fn is None else grad_fn.name()
        self.output_nr = tensor.output_nr


class CorruptionCheck:
    """Turns a saved tensor found written at unpack into a finding, and a changed version into
    PyTorch's own error followed by the attribution. Shared by both cores.

    `writes_logged`: whether writes were watched (level "full"), which decides how a finding
    without a seen write is worded.
    """

    def __init__(
        self,
        modules: ModuleStackProbe,
        on_finding: Callable[[Finding], None],
        *,
        writes_logged: bool,
    ) -> None:
        self._modules = modules
        self._on_finding = on_finding
        self._writes_logged = writes_logged
        self._wording = Wording()

    def learn_wording(self) -> None:
        """Ask torch how it words the error; before any saved-tensor hook is installed."""
        self._wording = _wording()

    def __call__(self, record: SavedRecord, version_now: int) -> None:
        evidence = CorruptionEvidence(
            saved=self._saved_tensor(record),
            node=_torch_compat.current_node_name() or "unknown node",
            version_now=version_now,
            writes=tuple(hit.resolve() for hit in record.hits),
            writes_logged=self._writes_logged,
            shared_writes=tuple(hit.resolve() for hit in record.shared),
        )
        finding = diagnose(evidence)
        if finding is None:
            return
        loud = version_now != record.version
        if not record.reported:
            record.reported = True
            self._on_finding(finding)
        if loud:
            message = pytorch_message(evidence, self._wording)
            raise deliberate(RuntimeError(f"{message}\n\n{explain(finding)}"))

    def unwatched(
        self,
        tensor: torch.Tensor,
        version_saved: int | None,
        grad_fn: str | None,
        output_nr: int,
    ) -> None:
        """PyTorch's own check and nothing more, for a probe that is off (NOTE [probe
        boundary] in guard.py): installed hooks switched PyTorch's check off."""
        version_now = tensor._version
        if version_saved is not None and version_now != version_saved:
            message = version_message(
                tensor.type(),
                tuple(tensor.shape),
                grad_fn,
                output_nr,
                version_now=version_now,
                version_saved=version_saved,
                wording=self._wording,
            )
            raise deliberate(RuntimeError(message))

    def _saved_tensor(self, record: SavedRecord) -> SavedTensor:
        tensor = record.tensor
        return SavedTensor(
            shape=tuple(tensor.shape),
            dtype=str(tensor.dtype).removeprefix("torch."),
            device=str(tensor.device),
            type_name=tensor.type(),
            version_saved=record.version,
            step=record.step,
            module=record.module,
            source=source_line(record.caller),
            grad_fn=_named_node(record),
            output_nr=0 if record.original is not None else record.output_nr,
            parameter=self._parameter_name(tensor),
        )

    def _parameter_name(self, tensor: torch.Tensor) -> str | None:
        key = _torch_compat.storage_key(tensor)
        return None if key is None else self._modules.parameter_name(key)


class SavedTensorProbe(GuardedProbe):
    """Installs the saved-tensor hooks and turns corrupted unpacks into findings.

    With `live` (the write log's map, level "full") every saved tensor is also registered
    by storage while autograd keeps it; without, autograd keeps the record itself.
    """

    def __init__(
        self,
        modules: ModuleStackProbe,
        steps: StepProbe,
        callers: CallerFinder,
        on_finding: Callable[[Finding], None],
        *,
        live: LiveSaved | None,
        guard: ProbeGuard | None = None,
    ) -> None:
        self._guard = guard or ProbeGuard("saved-tensor check", step=lambda: steps.step)
        self._live = live
        self._modules = modules
        self._steps = steps
        self._callers = callers
        self._check = CorruptionCheck(modules, on_finding, writes_logged=live is not None)

    def _install(self, stack: ExitStack) -> None:
        self._check.learn_wording()
        # Once the probe is off (NOTE [probe boundary] in guard.py) the hooks stay installed
        # (hooks are a per-thread stack: only the innermost pair can come off), so the
        # fallbacks keep PyTorch's version check, which they switch off, and nothing else.
        pack = self._guard(self._pack, fallback=_Unwatched)
        unpack = self._guard(self._unpack, fallback=self._unwatched_unpack)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, unpack))

    def _unwatched_unpack(self, packed: object) -> torch.Tensor:
        """PyTorch's own check for anything packed, once the probe is off."""
        if isinstance(packed, _Packed):
            packed = packed.record
        if not isinstance(packed, (SavedRecord, _Unwatched)):
            return packed  # type: ignore[return-value]
        self._check.unwatched(packed.tensor, packed.version, packed.grad_fn, packed.output_nr)
        return packed.tensor

    def _pack(self, tensor: torch.Tensor) -> object:
        if _torch_compat.compiling():
            detached = tensor.detach()
        else:
            # Below any dispatch mode (see NOTE [unobserved]): the write log's would cost a
            # Python round trip, and a user's would count gradtrace's op.
            with unobserved(tensor):
                detached = tensor.detach()
        version = _torch_compat.version_of(tensor)
        if version is None or tensor.numel() == 0:
            return detached
        grad_fn = tensor.grad_fn
        record = SavedRecord(
            detached,
            None if grad_fn is None else grad_fn.name(),
            tensor.output_nr,
            version,
            self._modules.current() or LOOP_OWNER,
            self._steps.step,
            self._callers.caller(),
        )
        if not _torch_compat.is_own_output(tensor):
            record.original = tensor
        if self._live is None:
            return record
        key = _torch_compat.storage_key(tensor)
        return detached if key is None else _Packed(record, key, self._live)

    def _unpack(self, packed: object) -> torch.Tensor:
        if isinstance(packed, _Packed):
            record = packed.record
        elif isinstance(packed, SavedRecord):
            record = packed
        else:
            return packed  # type: ignore[return-value]
        version_now = record.tensor._version
        if version_now != record.version or (record.hits and not record.reported):
            self._check(record, version_now)
        return record.tensor


def _named_node(record: SavedRecord) -> str | None:
    """The node PyTorch's own error would name (`SavedVariable::unpack`): for the saving
    node's output, that node; for an input, the tensor's grad_fn as it is now (after an
    in-place write, the writing op's node; for a view of a written base, AsStrided), with
    output 0."""
    if record.original is None:
        return record.grad_fn
    grad_fn = record.original.grad_fn
    return None if grad_fn is None else grad_fn.name()


@functools.cache
def _learnt_wording() -> Wording:
    return learn_wording(_torch_compat.version_error_message())


def _wording() -> Wording:
    # Not cached when PyTorch raised nothing (user hooks were active): ask again next time.
    wording = _learnt_wording()
    if wording == Wording():
        _learnt_wording.cache_clear()
    return wording


def layout_of(tensor: torch.Tensor) -> Layout:
    return tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.element_size()


def record_hits(
    records: Iterable[SavedRecord],
    write: Layout,
    version: int | None,
    make_hit: Callable[[], RawWrite],
) -> None:
    """Attach one write to every live saved tensor whose bytes it overlaps, and to those on
    other bytes of its buffer whose version counter it shares (`version`: the written
    tensor's version now; a counter the two share reads the same)."""
    hit = None
    for record in records:
        if record.overlaps(write):
            found = record.hits
        elif version is not None and _torch_compat.version_of(record.tensor) == version:
            found = record.shared
        else:
            continue
        if len(found) >= MAX_HITS_PER_SAVED:
            continue
        if hit is None:
            hit = make_hit()
        found.append(hit)


def _extent_bytes(layout: Layout) -> int:
    _, sizes, strides, itemsize = layout
    return (
        1 + sum((size - 1) * stride for size, stride in zip(sizes, strides, strict=True))
    ) * itemsize


def byte_blocks(layout: Layout) -> list[tuple[int, int]]:
    """The byte ranges `[start, end)` a strided layout touches, sorted by start.

    Dimensions are walked from the smallest stride; those that continue a contiguous run
    merge into one block. A layout with more than MAX_BLOCKS blocks is answered with its
    whole span: possibly a write too many, never one too few.
    """
    first, sizes, strides, itemsize = layout
    dims = sorted(
        (stride, size) for size, stride in zip(sizes, strides, strict=True) if size > 1 and stride
    )
    run = 1
    while dims and dims[0][0] == run:
        run *= dims.pop(0)[1]
    count = 1
    for _, size in dims:
        count *= size
    if count == 1 or count > MAX_BLOCKS:
        return [(first, first + _extent_bytes(layout))]
    starts = [0]
    for stride, size in dims:
        starts = [start + k * stride for start in starts for k in range(size)]
    length = run * itemsize
    return sorted((first + start * itemsize, first + start * itemsize + length) for start in starts)


def blocks_overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    """True if any range of `a` overlaps any range of `b` (both sorted by start)."""
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i][0] < b[j][1] and b[j][0] < a[i][1]:
            return True
        # The range that ends first cannot overlap anything later in the other list.
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return False


# Ops that write a parameter under no_grad inside torch's own forward, as documented:
# nn.Embedding(max_norm=...) renormalises the rows it looks up.
_LEGAL_NO_GRAD_PARAMETER_OPS = frozenset({"embedding_renorm_"})


def untracked_finding(
    modules: ModuleStackProbe, write: WriteEvent, tensor: torch.Tensor, output_of: str | None
) -> Finding | None:
    """The finding for an untracked write inside a forward (NOTE [untracked writes] in
    writes.py): into the output of module `output_of`, or into a parameter (under no_grad).
    Both cores: here, next to the corruption check they share."""
    if output_of is not None:
        return untracked_activation_write(write, output_of)
    if not tensor.requires_grad or write.op in _LEGAL_NO_GRAD_PARAMETER_OPS:
        return None
    key = _torch_compat.storage_key(tensor)
    parameter = None if key is None else modules.parameter_name(key)
    if parameter is None:
        return None
    return no_grad_parameter_write(write, parameter)
