"""Mark gradtrace's own tensor ops, so the write log never counts them as the user's.

The gradient probe sums module outputs into preallocated slots (`out=`: a write) and copies
results to pinned memory (`copy_`: a write); the write log would otherwise report those as
in-place writes of the user's modules.

NOTE [unobserved]: given the tensors it works on, and when they are all plain tensors,
`own_ops` also runs its ops below Python dispatch: no dispatch mode sees them, neither the
write log (a Python round trip costs several µs per op, and the gradient statistics launch
dozens per step) nor a mode of the user's (a FLOP counter should not count gradtrace).
Tensor subclasses (DTensor, say) need their Python dispatch to compute at all, so with one
among them nothing is skipped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType

import torch

_state = threading.local()

# The native core's switch that hides this thread's ops from its write observer (see
# `hide_from`); None while no native observer is installed.
_hide: Callable[[bool], bool] | None = None


def hide_from(hide: Callable[[bool], bool] | None) -> None:
    """Make `own_ops` call `hide(True)` on entry and `hide(previous)` on exit (None: stop).

    The native write observer is a dispatch key, not a Python mode: `unobserved` cannot
    step around it, so gradtrace's own ops are excluded from it by this switch instead.
    """
    global _hide
    _hide = hide


def in_own_ops() -> bool:
    return getattr(_state, "active", False)


def unobserved(*tensors: torch.Tensor) -> AbstractContextManager[object]:
    """Context where ops on these tensors skip every dispatch mode, if that is safe for them.

    See NOTE [unobserved]. Only gradtrace's own ops run inside it, never while Dynamo
    traces: a saved-tensor hook's `detach` under this guard, traced in a compiled module,
    let Dynamo trace into the write log's mode (torch 2.13).
    """
    # With no mode on the stack (it counts torch's infra modes too) there is nothing to skip.
    if tensors and torch._C._len_torch_dispatch_stack() and all(type(t) in _PLAIN for t in tensors):
        return torch._C._DisableTorchDispatch()
    return _NOTHING


# Tensor types that compute without Python dispatch.
_PLAIN = (torch.Tensor, torch.nn.Parameter)
# Reusable: it keeps no state.
_NOTHING = nullcontext()


class own_ops:
    """Context: gradtrace's own ops run here, with grad mode off. Cheap enough per module call.

    `own_ops(*tensors)` also hides the ops from dispatch modes when that is safe for these
    tensors (see `unobserved`).
    """

    __slots__ = ("_grad", "_hidden", "_native", "_outer", "_tensors")

    def __init__(self, *tensors: torch.Tensor) -> None:
        self._tensors = tensors

    def __enter__(self) -> None:
        self._outer = getattr(_state, "active", False)
        self._grad = torch.is_grad_enabled()
        _state.active = True
        # The C setter: `torch.set_grad_enabled` builds a context-manager object per call.
        torch._C._set_grad_enabled(False)
        self._hidden = unobserved(*self._tensors)
        self._hidden.__enter__()
        self._native = None if _hide is None else _hide(True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if _hide is not None and self._native is not None:
            _hide(self._native)
        self._hidden.__exit__(exc_type, exc, tb)
        torch._C._set_grad_enabled(self._grad)
        _state.active = self._outer


class library_writes:
    """Context: a library's own writes to its own memory, hidden from the write observers
    like gradtrace's own ops, with grad mode and dispatch left as they are (the library's
    code must run exactly as without gradtrace). See NOTE [FSDP2's own writes] in
    `_torch_compat`."""

    __slots__ = ("_native", "_outer")

    def __enter__(self) -> None:
        self._outer = getattr(_state, "active", False)
        _state.active = True
        self._native = None if _hide is None else _hide(True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if _hide is not None and self._native is not None:
            _hide(self._native)
        _state.active = self._outer
