"""Gradient statistics against the memory-bandwidth limit: the probe's own reductions timed
on a model's real gradients, next to the bytes they must move."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.models import Workload
from gradtrace.probes import _torch_compat


def timed_ms(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Time per call: the median over 5 batches of `repeats` back-to-back calls.

    On a GPU a pair of CUDA events spans each batch, so the time is the device's.
    """
    call()
    batches = []
    for _ in range(5):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(repeats):
                call()
            end.record()
            torch.cuda.synchronize()
            batches.append(start.elapsed_time(end) / repeats)
        else:
            t0 = time.perf_counter_ns()
            for _ in range(repeats):
                call()
            batches.append((time.perf_counter_ns() - t0) / 1e6 / repeats)
    return statistics.median(batches)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second a device-to-device copy of `nbytes` moves (read plus write)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (timed_ms(lambda: dst.copy_(src), device, 3) / 1e3)


def grad_stat_cost(work: Workload, device: torch.device, repeats: int) -> dict[str, Any]:
    """Time of the reductions the probe launches per recorded step, and their lower bound.

    The same `_torch_compat` calls as probes/grads.py, on the workload's real gradients:
    norms (gradient L2 norms: reads every gradient once), a sampled step (adds parameter
    norms and zero counts: every parameter and the gradients once more), and the update ratio
    (copy, subtract, norm: six parameter-sized passes). The limit is the bytes those passes
    must move divided by the measured copy bandwidth.
    """
    work.step()
    params = [p for p in work.model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    param_bytes = sum(p.numel() * p.element_size() for p in params)

    def norms() -> list[torch.Tensor]:
        return _torch_compat.foreach_norm(grads, 2)

    def sampled() -> list[torch.Tensor]:
        return (
            norms() + _torch_compat.foreach_norm(params, 2) + _torch_compat.foreach_norm(grads, 0)
        )

    def update() -> list[torch.Tensor]:
        before = _torch_compat.foreach_copy(params)
        _torch_compat.foreach_sub_(before, params)
        return _torch_compat.foreach_norm(before, 2)

    bandwidth = copy_bandwidth(device, max(256 * 2**20, 2 * grad_bytes))
    passes = {
        "norms": (norms, grad_bytes),
        "sampled": (sampled, 2 * grad_bytes + param_bytes),
        "update_ratio": (update, 6 * param_bytes),
    }
    result: dict[str, Any] = {
        "model": work.name,
        "grad_mib": grad_bytes / 2**20,
        "param_mib": param_bytes / 2**20,
        "copy_gb_s": bandwidth / 1e9,
    }
    with torch.no_grad():
        for name, (call, nbytes) in passes.items():
            result[f"{name}_ms"] = timed_ms(lambda c=call: torch.stack(c()), device, repeats)
            result[f"{name}_limit_ms"] = nbytes / bandwidth * 1e3
    return result
