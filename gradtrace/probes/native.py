"""The native core's probe: saved-tensor hooks and the write observer, in C++.

Produces what `SavedTensorProbe` and `WriteLogProbe` produce (the same records, counts,
findings and timeline writes) at a fraction of their cost: pack, unpack and every write run
in `gradtrace/_native/core.cpp`, and Python is called only for a finding (unpack of a
written saved tensor), for a code object seen for the first time, and for every write of
a step chosen for the timeline.

NOTE [what Python tells the core]: the module stack and the step probe publish the running
module's path, the stepping optimizer and the step index as they change (one C call each);
`own_ops` hides gradtrace's own ops from the observer. The core reads them per saved tensor
and per write, with no call back into Python.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from types import ModuleType

import torch

from gradtrace.events import Finding
from gradtrace.probes import _torch_compat
from gradtrace.probes.frames import Caller, is_user_code
from gradtrace.probes.guard import GuardedProbe, ProbeGuard
from gradtrace.probes.modules import LOOP_OWNER, ModuleStackProbe
from gradtrace.probes.own_ops import hide_from
from gradtrace.probes.saved import CorruptionCheck, RawWrite, SavedRecord, untracked_finding
from gradtrace.probes.steps import StepProbe

# Takes each write of a traced step: (op, owner, phase, the user's frame).
_AddWrite = Callable[[str, str, str, Caller | None], None]


class NativeCoreError(RuntimeError):
    """The compiled core's own bookkeeping failed; it stopped for the rest of the run."""


class NativeCoreProbe(GuardedProbe):
    """The saved-tensor check and (with `observe_writes`, level "full") the write log."""

    def __init__(
        self,
        core: ModuleType,
        modules: ModuleStackProbe,
        steps: StepProbe,
        on_finding: Callable[[Finding], None],
        *,
        observe_writes: bool,
        guard: ProbeGuard | None = None,
        readout_seen: Callable[[torch.Tensor, str], None] | None = None,
    ) -> None:
        self._guard = guard or ProbeGuard("native core", step=lambda: steps.step)
        self._core = core
        self._modules = modules
        self._steps = steps
        self._observe = observe_writes
        self._on_finding = on_finding
        self._readout_seen = readout_seen
        self._check = CorruptionCheck(modules, on_finding, writes_logged=observe_writes)
        self._aside = False
        self._add_write: _AddWrite | None = None

    def _install(self, stack: ExitStack) -> None:
        core = self._core
        self._check.learn_wording()
        guard = self._guard
        # NOTE [probe boundary] in guard.py: once off, unpack keeps PyTorch's own check only.
        core.configure(
            is_user_code,
            guard(self._on_check, fallback=self._unwatched),
            self._observe,
            guard(self._modules.owner_of, fallback=lambda obj: None),
            guard(self._on_untracked) if self._observe else None,
            self._readout_seen if self._observe else None,
        )
        stack.callback(core.reset)
        # The core stops its own work when it fails (NOTE [a core that fails] in core.cpp);
        # the failure is reported at the next step's end, or as the session closes.
        self._steps.on_updated(guard(self._report_failure))
        stack.callback(guard(self._report_failure), None)
        self._modules.publish_to(core.set_module)
        stack.callback(self._modules.publish_to, None)
        stack.callback(core.set_module, None)
        self._steps.publish_to(optimizer=core.set_optimizer, step=core.set_step)
        stack.callback(self._steps.publish_to, optimizer=None, step=None)
        stack.callback(core.set_optimizer, None)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(core.pack, core.unpack))
        if not self._observe:
            return
        # Compiled code would run its writes where no dispatcher sees them.
        stack.enter_context(_torch_compat.force_eager())
        hide_from(core.set_hidden)
        stack.callback(hide_from, None)
        core.set_observing(True)
        stack.callback(core.set_observing, False)
        # The core takes each module's output itself (no Python work per module call).
        self._modules.on_output(core.add_activations)
        self._modules.on_root_start(core.clear_activations)
        # Unwound before the observer goes off: a step that raised may have left it aside.
        stack.callback(self._step_back)
        self._steps.around_plain_update(guard(self._step_aside), guard(self._step_back))
        self._modules.on_root_start(guard(self._step_back))

    def take_counts(self) -> Counter[tuple[str, str, str]]:
        """Hand over the per-(owner, op, phase) write counts gathered since the last call."""
        phases = self._core.PHASES
        return Counter(
            {(owner, op, phases[phase]): n for owner, op, phase, n in self._core.take_counts()}
        )

    @property
    def tracing_writes(self) -> bool:
        """Whether every write is handed on now (a step chosen for trace.json)."""
        return self._add_write is not None

    def live_count(self) -> int:
        """Saved tensors registered by storage now (none between steps: nothing leaks)."""
        return self._core.live_count()

    def trace_writes(self, add_write: _AddWrite | None) -> None:
        """Hand every write, with its user frame, to `add_write` from now on (None: stop)."""
        self._add_write = add_write
        self._core.trace_writes(None if add_write is None else self._guard(self._traced_write))

    def _traced_write(self, op: str, owner: str, phase: int, caller: Caller | None) -> None:
        add_write = self._add_write
        if add_write is not None:
            add_write(op, owner, self._core.PHASES[phase], caller)

    def _step_aside(self) -> None:
        """A plain optimizer step with no saved tensor live writes nothing that matters (see
        NOTE [plain optimizer steps] in writes.py): the observer steps aside for it."""
        if not self._aside and self._add_write is None and self._core.live_count() == 0:
            self._aside = True
            self._core.set_observing(False)

    def _step_back(self) -> None:
        if self._aside:
            self._aside = False
            self._core.set_observing(True)

    def _report_failure(self, optimizer: object) -> None:
        failure = self._core.failure()
        if failure is not None:
            raise NativeCoreError(failure)

    def _unwatched(self, packed: object, version_now: int) -> None:
        """PyTorch's own check only, for a probe that is off."""
        tensor, grad_fn, output_nr, version, *_ = packed.info()
        self._check.unwatched(tensor, version, grad_fn, output_nr)

    def _on_untracked(
        self,
        seq: int,
        op: str,
        owner: str,
        phase: int,
        step: int,
        caller: Caller | None,
        output_of: str | None,
        tensor: torch.Tensor,
    ) -> None:
        """Called by the core for a write inside a forward that autograd did not record
        (NOTE [untracked writes] in writes.py)."""
        write = RawWrite(seq, op, owner, self._core.PHASES[phase], step, caller).resolve()
        finding = untracked_finding(self._modules, write, tensor, output_of)
        if finding is not None:
            self._on_finding(finding)

    def _on_check(self, packed: object, version_now: int) -> None:
        """Called by the core's unpack for a saved tensor written since it was packed."""
        (tensor, grad_fn, output_nr, version, module, step, caller, hits, reported, shared) = (
            packed.info()
        )
        record = SavedRecord(
            tensor, grad_fn, output_nr, version, module or LOOP_OWNER, step, caller
        )
        phases = self._core.PHASES
        record.hits = [
            RawWrite(seq, op, owner, phases[phase], step, where)
            for seq, op, owner, phase, step, where in hits
        ]
        record.shared = [
            RawWrite(seq, op, owner, phases[phase], step, where)
            for seq, op, owner, phase, step, where in shared
        ]
        record.reported = reported
        try:
            self._check(record, version_now)
        finally:
            if record.reported and not reported:
                packed.mark_reported()
