"""Timing: blocks of steps under one configuration, interleaved in rounds against untraced."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.configs import assert_clean, config_context
from bench.load import LoadMeter, hwm_mib, reset_hwm, rss_mib
from bench.models import Workload, build_workload


@dataclass
class ConfigResult:
    config: str
    step_ms: list[list[float]] = field(default_factory=list)  # per round, per step
    round_ratio: list[float] = field(default_factory=list)
    rss_peak_mib: list[float] = field(default_factory=list)  # per block (if HWM resettable)
    rss_peak_rise_mib: list[float] = field(default_factory=list)  # peak minus RSS at block start
    rss_growth_mib: list[float] = field(default_factory=list)  # per block, end - start RSS
    cuda_peak_mib: list[float] = field(default_factory=list)  # per block
    foreign_cpu: list[float] = field(default_factory=list)  # per block, other processes' share
    findings: int = 0

    @property
    def all_steps(self) -> list[float]:
        return [ms for block in self.step_ms for ms in block]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.all_steps)


def run_block(
    work: Workload, config: str, steps: int, run_dir: Path, device: torch.device
) -> tuple[list[float], int, float | None]:
    """Enter `config`, run one untimed step then `steps` timed steps; return times in ms."""
    holder: dict[str, Any] = {"findings": 0}
    times: list[float] = []
    cuda = device.type == "cuda"
    meter = LoadMeter()
    with config_context(config, run_dir, holder), meter:
        work.step()  # per-block warm-up: a fresh session fills its per-op caches here
        if cuda:
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(steps)
            ]
            torch.cuda.synchronize()
            for start, end in events:
                start.record()
                work.step()
                end.record()
            torch.cuda.synchronize()
            times = [start.elapsed_time(end) for start, end in events]
        else:
            for _ in range(steps):
                t0 = time.perf_counter_ns()
                work.step()
                times.append((time.perf_counter_ns() - t0) / 1e6)
    return times, holder["findings"], meter.share


@dataclass
class BlockResult:
    """One configuration's measurements in one round."""

    times: list[float]
    findings: int
    foreign: float | None
    rss_before: float | None
    rss_after: float | None
    rss_peak: float | None
    cuda_peak: float | None


def measure_block(
    work: Workload, config: str, steps: int, run_dir: Path, device: torch.device, hwm: bool
) -> BlockResult:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if hwm:
        reset_hwm()
    rss_before = rss_mib()
    times, findings, foreign = run_block(work, config, steps, run_dir, device)
    return BlockResult(
        times=times,
        findings=findings,
        foreign=foreign,
        rss_before=rss_before,
        rss_after=rss_mib(),
        rss_peak=hwm_mib() if hwm else None,
        cuda_peak=torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    )


def commit_round(results: dict[str, ConfigResult], blocks: dict[str, BlockResult]) -> None:
    base = statistics.median(blocks["untraced"].times)
    for config, block in blocks.items():
        res = results[config]
        res.step_ms.append(block.times)
        res.round_ratio.append(statistics.median(block.times) / base)
        res.findings += block.findings
        if block.foreign is not None:
            res.foreign_cpu.append(block.foreign)
        if block.rss_peak is not None:
            res.rss_peak_mib.append(block.rss_peak)
            if block.rss_before is not None:
                res.rss_peak_rise_mib.append(block.rss_peak - block.rss_before)
        if block.rss_before is not None and block.rss_after is not None:
            res.rss_growth_mib.append(block.rss_after - block.rss_before)
        if block.cuda_peak is not None:
            res.cuda_peak_mib.append(block.cuda_peak)


def bench_model(
    name: str,
    device: torch.device,
    configs: tuple[str, ...],
    warmup: int,
    steps: int,
    rounds: int,
    tmp: Path,
    clean: dict[str, Any],
    hwm: bool,
    max_other_load: float,
    max_retries: int,
) -> dict[str, Any]:
    """Warm up every config, then run `rounds` interleaved rounds.

    A round during which other processes took more than `max_other_load` of the machine's
    CPU in any block is discarded and rerun, at most `max_retries` times per model; the
    discarded rounds' ratios are kept in the results for the record.
    """
    work = build_workload(name, device)
    results = {config: ConfigResult(config) for config in configs}
    discarded: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for config in configs:
        run_block(work, config, warmup, tmp / f"{name}-warmup-{config}", device)
        assert_clean(clean, f"{name} warm-up {config}")
    attempt = 0
    while len(results[configs[0]].step_ms) < rounds:
        shift = attempt % len(configs)
        blocks: dict[str, BlockResult] = {}
        for config in configs[shift:] + configs[:shift]:
            run_dir = tmp / f"{name}-a{attempt}-{config}"
            blocks[config] = measure_block(work, config, steps, run_dir, device, hwm)
            assert_clean(clean, f"{name} round attempt {attempt} {config}")
        attempt += 1
        loads = [b.foreign for b in blocks.values() if b.foreign is not None]
        if loads and max(loads) > max_other_load and len(discarded) < max_retries:
            base = statistics.median(blocks["untraced"].times)
            discarded.append(
                {
                    "max_other_load": max(loads),
                    "ratios": {c: statistics.median(b.times) / base for c, b in blocks.items()},
                }
            )
            continue
        commit_round(results, blocks)
    elapsed = time.perf_counter() - t_start
    params = work.params
    del work
    return {
        "model": name,
        "params": params,
        "seconds": elapsed,
        "results": results,
        "discarded_rounds": discarded,
    }
