"""Mark gradtrace's own tensor ops, so the write log never counts them as the user's.

The gradient probe sums module outputs into preallocated slots (`out=`: a write) and copies
results to pinned memory (`copy_`: a write); the write log would otherwise report those as
in-place writes of the user's modules.
"""

from __future__ import annotations

import threading
from types import TracebackType

import torch

_state = threading.local()


def in_own_ops() -> bool:
    return getattr(_state, "active", False)


class own_ops:
    """Context: gradtrace's own ops run here, with grad mode off. Cheap enough per module call."""

    __slots__ = ("_grad", "_outer")

    def __enter__(self) -> None:
        self._outer = in_own_ops()
        self._grad = torch.is_grad_enabled()
        _state.active = True
        torch.set_grad_enabled(False)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        torch.set_grad_enabled(self._grad)
        _state.active = self._outer
