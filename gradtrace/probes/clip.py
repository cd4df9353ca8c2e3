"""Gradient clipping: the norm before clipping, from `torch.nn.utils.clip_grad_norm_`.

`clip_grad_norm_` returns the gradients' total norm from before it scaled them: a device
tensor, the same one its caller gets, which gradtrace reads with the next optimizer step's
statistics (never here: reading it would synchronise). The norm after clipping is the
global norm that step records anyway.

NOTE [why a wrapper]: torch has no hook on clipping. For the session's lifetime the
function is replaced, in `torch.nn.utils` and in `torch.nn.utils.clip_grad` (where the
deprecated `clip_grad_norm` looks it up), by a wrapper that calls the original with the same
arguments and returns its result unchanged; close restores both. Code that looks it up when
it clips (`torch.nn.utils.clip_grad_norm_(...)`, Lightning, Hugging Face Accelerate) is
seen; a name bound before the session started (`from torch.nn.utils import
clip_grad_norm_` at import time) still calls the original, unseen.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.utils
from torch.nn.utils import clip_grad

from gradtrace.probes.guard import GuardedProbe, ProbeGuard

OnClip = Callable[[torch.Tensor, "float | torch.Tensor", float], None]


class GradClipProbe(GuardedProbe):
    def __init__(self, on_clip: OnClip, *, guard: ProbeGuard | None = None) -> None:
        self._on_clip = on_clip
        self._guard = guard or ProbeGuard("gradient clipping")

    def _install(self, stack: ExitStack) -> None:
        original = clip_grad.clip_grad_norm_
        signature = inspect.signature(original)
        on_clip = self._on_clip

        def observe(total_norm: torch.Tensor, args: Any, kwargs: Any) -> None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            on_clip(total_norm, bound.arguments["max_norm"], bound.arguments["norm_type"])

        observed = self._guard(observe)

        @functools.wraps(original)
        def clip_grad_norm_(*args: Any, **kwargs: Any) -> torch.Tensor:
            total_norm = original(*args, **kwargs)  # the user's call: its errors are theirs
            observed(total_norm, args, kwargs)
            return total_norm

        for module in (torch.nn.utils, clip_grad):
            if module.clip_grad_norm_ is original:
                module.clip_grad_norm_ = clip_grad_norm_
                stack.callback(setattr, module, "clip_grad_norm_", original)
