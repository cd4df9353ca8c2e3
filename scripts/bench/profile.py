"""One session looked at closely: cProfile of its steps, and host memory over a long run."""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import pstats
from collections.abc import Iterator
from pathlib import Path

import torch

import gradtrace
from bench.load import rss_mib
from bench.models import Workload, build_workload
from bench.tables import device_name
from gradtrace.session import Session


@contextlib.contextmanager
def warm_session(
    device: torch.device, model: str, level: str, run_dir: Path, core: str | None
) -> Iterator[Workload]:
    """The model warmed up untraced, then a session at `level` past its first step (which
    fills the session's per-op caches): what a profile or a hook count should look at."""
    work = build_workload(model, device)
    for _ in range(2):
        work.step()
    with Session(run_dir, level=level, trace_steps="none", core=core):
        work.step()
        yield work


def profile_level(
    device: torch.device, model: str, level: str, steps: int, top: int, tmp: Path, core: str | None
) -> str:
    profiler = cProfile.Profile()
    with warm_session(device, model, level, tmp / f"profile-{model}-{level}", core) as work:
        profiler.enable()
        for _ in range(steps):
            work.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)

    # tottime summed per gradtrace source file: where the tracer's own Python time goes.
    root = str(Path(gradtrace.__file__).resolve().parent)
    per_file: dict[str, tuple[float, int]] = {}
    total = 0.0
    for (filename, _, _), (_, ncalls, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        total += tottime
        if filename.startswith(root):
            rel = os.path.relpath(filename, os.path.dirname(root))
            t, n = per_file.get(rel, (0.0, 0))
            per_file[rel] = (t + tottime, n + ncalls)
    out.write("\ntottime by gradtrace file (per step):\n")
    for rel, (t, n) in sorted(per_file.items(), key=lambda kv: -kv[1][0]):
        out.write(
            f"  {rel:40s} {t / steps * 1e3:8.3f} ms/step  {n / steps:8.0f} calls/step  "
            f"{100 * t / total:5.1f}% of profiled tottime\n"
        )


def soak(device: torch.device, level: str, steps: int, tmp: Path) -> str:
    """Host memory over a long run, and how fast the run directory grows."""
    work = build_workload("mlp", device)
    run_dir = tmp / f"soak-{level}"
    lines = [f"# soak: mlp, {steps} steps, level {level}, {device_name(device)}", ""]
    lines.append("| step | host RSS MiB | run dir MiB |")
    lines.append("|---|---|---|")
    with Session(run_dir, level=level, trace_steps="none"):
        for step in range(1, steps + 1):
            work.step()
            if step % 1000 == 0:
                size = sum(f.stat().st_size for f in run_dir.iterdir()) / 2**20
                lines.append(f"| {step} | {rss_mib():.1f} | {size:.2f} |")
    size = sum(f.stat().st_size for f in run_dir.iterdir()) / 2**20
    per_1000 = size / steps * 1000
    lines.append(f"\nrun directory after close: {size:.2f} MiB ({per_1000:.2f} MiB per 1000 steps)")
    return "\n".join(lines)
