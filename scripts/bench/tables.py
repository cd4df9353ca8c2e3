"""What a report says: the machine and checkout measured, and the results as Markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

import gradtrace
from bench.configs import CONFIG_LABELS
from bench.harness import ConfigResult


def gradtrace_revision() -> str:
    """Commit of the gradtrace checkout being measured, marked dirty if it has edits."""
    import subprocess

    root = Path(gradtrace.__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "gradtrace"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"


def ratio(res: ConfigResult) -> float:
    """The median of the per-round ratios: each block against the untraced block of its own
    round (paired), so a machine that drifts between rounds moves both sides alike."""
    return statistics.median(res.round_ratio)


def summary_table(models: list[dict[str, Any]], configs: tuple[str, ...]) -> str:
    head = [
        "model",
        "untraced median ms",
        *[CONFIG_LABELS[c] for c in configs[1:]],
        "other-process CPU % (median / max of blocks)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in models:
        res = entry["results"]
        base = res["untraced"]
        cells = [entry["model"], f"{base.median_ms:.2f}"]
        for config in configs[1:]:
            r = res[config]
            cells.append(f"{ratio(r):.2f}× ({min(r.round_ratio):.2f}–{max(r.round_ratio):.2f})")
        loads = [share for r in res.values() for share in r.foreign_cpu]
        cells.append(
            f"{100 * statistics.median(loads):.0f} / {100 * max(loads):.0f}" if loads else "n/a"
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(models: list[dict[str, Any]], configs: tuple[str, ...], cuda: bool) -> str:
    head = [
        "model",
        "config",
        "median ms",
        "ratio",
        "round ratios min–max",
        "host RSS peak rise MiB (max over blocks)",
        "RSS growth MiB (sum over blocks)",
    ]
    if cuda:
        head.append("CUDA peak MiB")
    head.append("findings")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in models:
        res = entry["results"]
        for config in configs:
            r = res[config]
            cells = [
                entry["model"],
                CONFIG_LABELS[config],
                f"{r.median_ms:.2f}",
                f"{ratio(r):.2f}×",
                f"{min(r.round_ratio):.2f}–{max(r.round_ratio):.2f}",
                f"{max(r.rss_peak_rise_mib):.1f}" if r.rss_peak_rise_mib else "n/a",
                f"{sum(r.rss_growth_mib):+.1f}" if r.rss_growth_mib else "n/a",
            ]
            if cuda:
                cells.append(f"{max(r.cuda_peak_mib):.0f}")
            cells.append(str(r.findings) if config.startswith("gt-") else "–")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grad_stat_table(costs: list[dict[str, Any]]) -> str:
    head = [
        "model",
        "grads MiB",
        "params MiB",
        "copy GB/s (measured)",
        "norms ms (limit)",
        "sampled step ms (limit)",
        "update ratio ms (limit)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in costs:
        cells = [
            c["model"],
            f"{c['grad_mib']:.1f}",
            f"{c['param_mib']:.1f}",
            f"{c['copy_gb_s']:.1f}",
            *(
                f"{c[f'{name}_ms']:.3f} ({c[f'{name}_limit_ms']:.3f}, "
                f"{c[f'{name}_ms'] / c[f'{name}_limit_ms']:.1f}×)"
                for name in ("norms", "sampled", "update_ratio")
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
