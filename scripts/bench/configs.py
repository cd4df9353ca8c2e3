"""The configurations a block runs under (untraced, gradtrace, anomaly mode, the floors), and
the check that each one leaves torch's global state as it found it."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradtrace import _native
from gradtrace.probes import _torch_compat
from gradtrace.probes.grads import BOUNDED_MODULES
from gradtrace.session import Session, active

CONFIGS = (
    "untraced",
    "gt-light",
    "gt-full",
    "gt-light-py",
    "gt-full-py",
    "anomaly-nonan",
    "anomaly",
)
# --grad-stats: the gradient statistics on and off, and with the opt-in update ratio.
GRAD_STAT_CONFIGS = ("untraced", "gt-light-nostats", "gt-light", "gt-light-update")
# --floors: the least each level's mechanisms cost with nothing done in them, next to gradtrace.
FLOOR_CONFIGS = (
    "untraced",
    "floor-hooks",
    "floor-light",
    "gt-light",
    "floor-full",
    "floor-native",
    "gt-full",
)
CONFIG_LABELS = {
    "untraced": "untraced",
    "gt-light-nostats": "gradtrace light, grad stats off",
    "gt-light": "gradtrace light",
    "gt-light-update": "gradtrace light + update ratio",
    "gt-full": "gradtrace full",
    "gt-light-py": "gradtrace light, Python core",
    "gt-full-py": "gradtrace full, Python core",
    "anomaly-nonan": "detect_anomaly(check_nan=False)",
    "anomaly": "detect_anomaly()",
    "floor-hooks": "floor: empty module hooks + saved-tensor version check",
    "floor-light": "floor: + output sums + gradient norms",
    "floor-full": "floor: + empty dispatch mode",
    "floor-native": "floor: empty module hooks + native pack/unpack and write observer",
}


@contextlib.contextmanager
def config_context(config: str, run_dir: Path, holder: dict[str, Any]) -> Iterator[None]:
    """Enter one configuration; `holder["findings"]` gets gradtrace's finding count."""
    if config == "untraced":
        yield
    elif config.startswith("gt-"):
        level = "full" if config.startswith("gt-full") else "light"
        options = {
            # "-py": the Python probes; otherwise the native core where it builds.
            "core": "python" if config.endswith("-py") else None,
            "grad_stats": config != "gt-light-nostats",
            "update_ratio": config == "gt-light-update",
            # Steady state: the steps timed for trace.json (the first three by default)
            # cost more on purpose, and each block opens a new session.
            "trace_steps": "none",
        }
        with Session(run_dir, level=level, **options) as session:
            yield
        holder["findings"] = len(session.findings)
    elif config.startswith("floor-"):
        with floor_mechanisms(config):
            yield
    elif config in ("anomaly-nonan", "anomaly"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Anomaly Detection has been enabled..."
            with torch.autograd.detect_anomaly(check_nan=config == "anomaly"):
                yield
    else:
        raise ValueError(config)


@contextlib.contextmanager
def floor_mechanisms(config: str) -> Iterator[None]:
    """The mechanisms a level stands on, each doing the least it must and nothing else.

    floor-hooks: a global forward pre-hook and forward hook that return at once, and
    saved-tensor hooks that keep a detached alias with its version and compare it at unpack
    (installing hooks turns torch's own check off). floor-light adds a float32 sum of the
    output of every module without children that is not a bounded activation (no more sums
    than gradtrace takes, which also sums containers that change their child's output) and,
    in an optimizer pre-hook, one `_foreach_norm` of the gradients and a `stack` of the
    results. floor-full adds a dispatch mode that only calls the op, on from
    one optimizer step's end to the next one's start (gradtrace steps aside for a plain step).
    No names, no frames, no store: what is left between these and gradtrace is gradtrace's
    own Python.
    """
    from torch.nn.modules.module import (
        register_module_forward_hook,
        register_module_forward_pre_hook,
    )
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    def pack(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        return tensor.detach(), tensor._version

    def unpack(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
        tensor, version = packed
        if tensor._version != version:
            raise RuntimeError("saved tensor modified")
        return tensor

    sums: list[torch.Tensor] = []

    def sum_output(module: nn.Module, args: object, output: object) -> None:
        if (
            isinstance(output, torch.Tensor)
            and output.is_floating_point()
            and not isinstance(module, BOUNDED_MODULES)
            and next(module.children(), None) is None
        ):
            with torch.no_grad():
                sums.append(output.sum(dtype=torch.float32))

    def norms(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        with torch.no_grad():
            torch.stack(_torch_compat.foreach_norm(grads, 2) + sums)
        sums.clear()

    mode = _FloorMode()

    def mode_off(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        _torch_compat.step_aside(mode)

    def mode_on(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        _torch_compat.step_back(mode)

    with contextlib.ExitStack() as stack:
        stack.enter_context(register_module_forward_pre_hook(lambda module, args: None))
        stack.enter_context(register_module_forward_hook(lambda module, args, output: None))
        if config == "floor-native":
            stack.enter_context(native_floor())
            yield
            return
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, unpack))
        if config in ("floor-light", "floor-full"):
            stack.enter_context(register_module_forward_hook(sum_output))
            stack.enter_context(register_optimizer_step_pre_hook(norms))
        if config == "floor-full":
            stack.enter_context(mode)
            stack.enter_context(register_optimizer_step_pre_hook(mode_off))
            stack.enter_context(register_optimizer_step_post_hook(mode_on))
        yield


@contextlib.contextmanager
def native_floor() -> Iterator[None]:
    """The native core's mechanisms doing the least they can: pack and unpack in C with
    every record registered by storage, and the write observer counting every write, off
    from one optimizer step's start to its end (gradtrace steps aside for a plain step).
    The first frame is taken as the user's, and no finding is ever made."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    core = _native.load()
    if core is None:
        raise SystemExit(f"--floors needs the native core: {_native.status().reason}")
    core.configure(lambda code: True, lambda packed, version: None, True, None, None, None)
    with contextlib.ExitStack() as stack:
        stack.callback(core.reset)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(core.pack, core.unpack))
        core.set_observing(True)
        stack.callback(core.set_observing, False)

        def observe(on: bool) -> Callable[..., None]:
            def hook(*_: object) -> None:
                core.set_observing(on)

            return hook

        stack.enter_context(register_optimizer_step_pre_hook(observe(False)))
        stack.enter_context(register_optimizer_step_post_hook(observe(True)))
        yield
        core.take_counts()


class _FloorMode(_torch_compat.UntracedDynamoMode):
    """A dispatch mode that only calls the op (on the same base as gradtrace's write log)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


def global_state() -> dict[str, Any]:
    """The torch global state a probe or anomaly mode could leave behind."""
    import torch.nn.modules.module as mod
    import torch.optim.optimizer as opt

    hooks = {
        name: len(getattr(mod, name))
        for name in dir(mod)
        if name.startswith("_global_") and isinstance(getattr(mod, name), dict)
    }
    return {
        "module_hooks": hooks,
        "full_backward_hook_flag": mod._global_is_full_backward_hook,
        "optimizer_pre_hooks": len(opt._global_optimizer_pre_hooks),
        "optimizer_post_hooks": len(opt._global_optimizer_post_hooks),
        "dispatch_modes": torch._C._len_torch_dispatch_stack(),
        "saved_tensor_hooks": torch._C._autograd._top_saved_tensors_default_hooks(False)
        is not None,
        "anomaly": torch.is_anomaly_enabled(),
        "anomaly_check_nan": torch.is_anomaly_check_nan_enabled(),
        "grad_enabled": torch.is_grad_enabled(),
        "gradtrace_active": active() is not None,
    }


def assert_clean(expected: dict[str, Any], where: str) -> None:
    now = global_state()
    if now != expected:
        diff = {k: (expected.get(k), v) for k, v in now.items() if expected.get(k) != v}
        raise SystemExit(f"torch global state changed after {where}: {diff}")
