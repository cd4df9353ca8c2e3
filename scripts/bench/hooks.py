"""Host time inside each gradtrace hook per step: every hook torch calls into gradtrace,
wrapped with a timer by name (the names are gradtrace's private methods, so
tests/test_bench_script.py checks that they are still found and called)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bench.profile import warm_session

# The methods torch calls into gradtrace, by probe: every host microsecond gradtrace adds to a
# step starts in one of them (the store thread's work aside).
HOOKS = {
    "gradtrace.probes.modules:ModuleStackProbe": ("_enter", "_leave"),
    "gradtrace.probes.grads:GradStatsProbe": (
        "_after_forward",
        "_output_grad_arrived",
        "_arrived_hook",
    ),
    "gradtrace.probes.saved:SavedTensorProbe": ("_pack", "_unpack"),
    "gradtrace.probes.saved:_Packed": ("__del__",),
    "gradtrace.probes.steps:StepProbe": ("_before", "_after"),
    "gradtrace.probes.writes:WriteLogProbe": ("record",),
}
# Counted, not timed: the write log's dispatch runs the op itself inside, so its time is
# mostly the op's. Its own cost per op is the Python round trip (see docs/benchmarks.md).
COUNTED_HOOKS = {"gradtrace.probes.writes:_WriteLogMode": ("__torch_dispatch__",)}


@contextlib.contextmanager
def timed_hooks(totals: dict[str, list[float]]) -> Iterator[None]:
    """Wrap every hook in HOOKS with a host timer; `totals[name]` gets [seconds, calls].

    Only the outermost hook on a thread is timed (a hook's own ops may call others), and the
    wrapper adds about 0.5 µs per call. COUNTED_HOOKS get calls only (seconds stay NaN).
    """
    depth = threading.local()
    originals = []
    for hooks, timed in ((HOOKS, True), (COUNTED_HOOKS, False)):
        for where, names in hooks.items():
            module_name, class_name = where.split(":")
            cls = getattr(importlib.import_module(module_name), class_name)
            for name in names:
                original = cls.__dict__[name]
                originals.append((cls, name, original))
                label = f"{class_name}.{name}"
                setattr(cls, name, _timed(original, label, totals, depth if timed else None))
    try:
        yield
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)


def _timed(
    hook: Callable[..., Any],
    label: str,
    totals: dict[str, list[float]],
    depth: threading.local | None,
) -> Callable[..., Any]:
    """`hook` with a timer around it, or (no `depth`) a call counter only."""

    @functools.wraps(hook)
    def timed(*args: Any, **kwargs: Any) -> Any:
        entry = totals.setdefault(label, [0.0 if depth is not None else math.nan, 0])
        entry[1] += 1
        if depth is None or getattr(depth, "n", 0):
            return hook(*args, **kwargs)
        depth.n = 1
        start = time.perf_counter()
        try:
            return hook(*args, **kwargs)
        finally:
            entry[0] += time.perf_counter() - start
            depth.n = 0

    return timed


def hook_time(
    device: torch.device, model: str, level: str, steps: int, tmp: Path, core: str | None
) -> str:
    """Host time spent inside gradtrace's hooks per step, per hook: where the overhead starts.

    Unlike step-time ratios this hardly moves with the machine's load, so it can compare two
    commits on a shared box.
    """
    totals: dict[str, list[float]] = {}
    run_dir = tmp / f"hooks-{model}-{level}"
    with timed_hooks(totals), warm_session(device, model, level, run_dir, core) as work:
        totals.clear()  # the first step is not counted
        for _ in range(steps):
            work.step()
    lines = ["| hook | ms per step | calls per step | µs per call |", "|---|---|---|---|"]
    timed = {label: entry for label, entry in totals.items() if not math.isnan(entry[0])}
    for label, (seconds, calls) in sorted(timed.items(), key=lambda kv: -kv[1][0]):
        lines.append(
            f"| {label} | {seconds / steps * 1e3:.3f} | {calls / steps:.1f} | "
            f"{seconds / calls * 1e6:.1f} |"
        )
    total = sum(seconds for seconds, _ in timed.values())
    lines.append(f"| total | {total / steps * 1e3:.3f} | | |")
    for label, (_, calls) in totals.items():
        if label not in timed:
            lines.append(f"| {label} (counted only: runs the op) | – | {calls / steps:.1f} | – |")
    return "\n".join(lines)
