"""FSDP2 (`fully_shard`): its own parameter and gradient memory moves are never the user's.

See NOTE [FSDP2's own writes] in `_torch_compat`: FSDP2 refills the unsharded parameters
autograd saved, skipping the version counter, before each backward. This probe runs those
moves hidden from the write observers (as gradtrace's own ops are), from the first forward
after the program imported FSDP2 (its pre-forward hooks run after gradtrace's global one)
until the session closes. Writes the user's code makes to sharded modules are observed as
any other.
"""

from __future__ import annotations

from contextlib import ExitStack

from gradtrace.probes import _torch_compat
from gradtrace.probes.guard import GuardedProbe, ProbeGuard
from gradtrace.probes.modules import ModuleStackProbe
from gradtrace.probes.own_ops import library_writes


class FsdpWritesProbe(GuardedProbe):
    def __init__(self, modules: ModuleStackProbe, *, guard: ProbeGuard | None = None) -> None:
        self._guard = guard or ProbeGuard("FSDP2 writes")
        self._modules = modules
        self._stack: ExitStack | None = None

    def _install(self, stack: ExitStack) -> None:
        self._stack = stack
        self._wrap()
        if self._stack is not None:
            self._modules.on_root_start(self._guard(self._wrap))

    def _wrap(self) -> None:
        """Wrap FSDP2's internals once the program has imported them (a lookup until then)."""
        stack = self._stack
        if stack is None:
            return
        undo = _torch_compat.around_fsdp_internals(library_writes)
        if undo is not None:
            self._stack = None
            stack.callback(undo)
