"""Shared fixtures: fail any test that leaves a gradtrace (or any other) hook attached."""

from __future__ import annotations

import pytest
import torch
import torch.nn.modules.module as torch_module
import torch.optim.optimizer as torch_optimizer
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from gradtrace import _native, session

# GradScaler.update and clip_grad_norm_ as torch ships them: gradtrace wraps them while a
# session runs.
_SCALER_UPDATE = torch.amp.GradScaler.update
_CLIP_GRAD_NORM = torch.nn.utils.clip_grad.clip_grad_norm_


def attached_hooks() -> list[str]:
    """Names of the global hooks and modes that are attached right now (empty when clean)."""
    attached = [
        name
        for name, hooks in [
            ("forward pre-hook", torch_module._global_forward_pre_hooks),
            ("forward hook", torch_module._global_forward_hooks),
            ("backward hook", torch_module._global_backward_hooks),
            ("backward pre-hook", torch_module._global_backward_pre_hooks),
            ("optimizer step pre-hook", torch_optimizer._global_optimizer_pre_hooks),
            ("optimizer step post-hook", torch_optimizer._global_optimizer_post_hooks),
        ]
        if hooks
    ]
    if _get_current_dispatch_mode_stack():
        attached.append("torch dispatch mode")
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        attached.append("saved-tensor hooks")
    if _native.observing():
        attached.append("native write observer")
    if session.active() is not None:
        attached.append("active gradtrace session")
    if torch.amp.GradScaler.update is not _SCALER_UPDATE:
        attached.append("GradScaler.update wrapper")
    if (torch.nn.utils.clip_grad_norm_, torch.nn.utils.clip_grad.clip_grad_norm_) != (
        _CLIP_GRAD_NORM,
        _CLIP_GRAD_NORM,
    ):
        attached.append("clip_grad_norm_ wrapper")
    return attached


@pytest.fixture(autouse=True)
def no_hooks_left_behind():
    assert attached_hooks() == [], "a hook was attached before the test started"
    yield
    left = attached_hooks()
    assert left == [], f"test left hooks attached: {', '.join(left)}"
