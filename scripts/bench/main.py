"""Measure what tracing costs: gradtrace light/full against untraced and anomaly mode.

Three models (a 4-layer MLP, a small ResNet-style CNN, a GPT-style decoder) train with AdamW
under five configurations: untraced, gradtrace "light", gradtrace "full",
`detect_anomaly(check_nan=False)` and `detect_anomaly()`. After a warm-up, the configurations
run interleaved in rounds (each round runs every configuration for `--steps` timed steps,
the order rotated each round) so that thermal or background drift hits all of them alike.
`--grad-stats` runs untraced, gradtrace "light" with the gradient statistics off, on, and
on with the update ratio instead, then times the statistics' own reductions per recorded
step against the limit memory bandwidth sets (measured with a device-to-device copy).

Reported per model and configuration: median step time, its ratio to untraced (the median
of per-round ratios, each block against its own round's untraced block) with their min/max,
peak CUDA memory (reset per block) and host RSS (peak per block where the kernel lets the
high-water mark be reset, plus RSS growth over the blocks).

    python scripts/bench_overhead.py --quick           # < 60 s on a 2-core CPU
    python scripts/bench_overhead.py --device cuda --json results.json
    python scripts/bench_overhead.py --grad-stats --quick  # grad stats off/on, vs bandwidth
    python scripts/bench_overhead.py --profile         # cProfile of full-level GPT steps
    python scripts/bench_overhead.py --hook-time --profile-level light --profile-model cnn
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.configs import CONFIGS, FLOOR_CONFIGS, GRAD_STAT_CONFIGS, global_state
from bench.grad_stats import grad_stat_cost
from bench.harness import bench_model
from bench.hooks import hook_time
from bench.load import reset_hwm
from bench.models import MODELS, SHAPES, build_workload
from bench.profile import profile_level, soak
from bench.tables import (
    detail_table,
    device_name,
    grad_stat_table,
    gradtrace_revision,
    summary_table,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--quick", action="store_true", help="small run: < 60 s on a 2-core CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per config")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--json", type=Path, default=None, help="also write raw results here")
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.25,
        help="rerun a round if other processes took more than this share of the machine's CPU "
        "in any of its blocks (default 0.25; 1 disables)",
    )
    # What to run instead of the five configurations: one at most.
    modes = parser.add_mutually_exclusive_group()
    parser.add_argument(
        "--max-retries", type=int, default=None, help="rerun rounds per model at most this often"
    )
    modes.add_argument(
        "--grad-stats",
        action="store_true",
        help="instead of the five configurations: gradient statistics off / on / with the "
        "update ratio (all at level light), then their time per recorded step against the "
        "memory-bandwidth limit",
    )
    modes.add_argument(
        "--floors",
        action="store_true",
        help="instead of the five configurations: each level's mechanisms doing nothing "
        "(empty hooks, version check, output sums and norms, an empty dispatch mode) next to "
        "gradtrace light and full",
    )
    modes.add_argument(
        "--profile", action="store_true", help="cProfile gradtrace steps (see --profile-level)"
    )
    modes.add_argument(
        "--hook-time",
        action="store_true",
        help="instead: host time inside each gradtrace hook per step (see --profile-level, "
        "--profile-model, --profile-steps)",
    )
    parser.add_argument("--profile-level", choices=("light", "full"), default="full")
    parser.add_argument("--profile-model", choices=MODELS, default="gpt")
    modes.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="STEPS",
        help="instead: train the MLP for STEPS steps under --profile-level, sampling host RSS "
        "every 1000 steps, and report the run directory's size",
    )
    parser.add_argument(
        "--profile-core",
        choices=("native", "python"),
        default="native",
        help="core for --profile and --hook-time (native: where it builds)",
    )
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--profile-top", type=int, default=25)
    args = parser.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    steps = args.steps or (5 if args.quick else 10)
    rounds = args.rounds or (5 if args.quick else 8)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    max_retries = args.max_retries if args.max_retries is not None else max(2, rounds // 2)
    models = tuple(m for m in args.models.split(",") if m)
    for m in models:
        if m not in MODELS:
            parser.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    if steps < 1 or rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    configs = GRAD_STAT_CONFIGS if args.grad_stats else FLOOR_CONFIGS if args.floors else CONFIGS

    header = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "gradtrace": gradtrace_revision(),
        "platform": platform.platform(),
        "autocast": "bf16" if device.type == "cuda" else "off (fp32)",
        "optimizer": "AdamW(lr=1e-4), default implementation",
        "configs": list(configs),
        "steps_per_block": steps,
        "rounds": rounds,
        "warmup_steps_per_config": warmup,
        "untimed_steps_per_block": 1,
        "quick": args.quick,
        "max_other_load": args.max_other_load,
        "max_retries_per_model": max_retries,
        "shapes": {m: SHAPES[device.type][m] for m in models},
    }

    with tempfile.TemporaryDirectory(prefix="gradtrace-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if args.soak:
            print(soak(device, args.profile_level, args.soak, tmp))
            return 0
        core = None if args.profile_core == "native" else "python"
        if args.hook_time:
            print(
                f"# gradtrace {args.profile_level}-level hook time: {args.profile_model}, "
                f"{args.profile_steps} steps; {header['device']}; torch {header['torch']}; "
                f"gradtrace {header['gradtrace']}\n"
            )
            print(
                hook_time(
                    device,
                    args.profile_model,
                    args.profile_level,
                    args.profile_steps,
                    tmp,
                    core,
                )
            )
            return 0
        if args.profile:
            print(
                f"# gradtrace {args.profile_level}-level profile: {args.profile_model}, "
                f"{args.profile_steps} steps"
            )
            print(f"device: {header['device']}; torch {header['torch']}; python {header['python']}")
            print(f"gradtrace: {header['gradtrace']}")
            print(f"shape: {SHAPES[device.type][args.profile_model]}\n")
            print(
                profile_level(
                    device,
                    args.profile_model,
                    args.profile_level,
                    args.profile_steps,
                    args.profile_top,
                    tmp,
                    core,
                )
            )
            return 0

        clean = global_state()
        hwm_resettable = reset_hwm()
        header["rss_peak_per_block"] = hwm_resettable
        print("# gradtrace overhead benchmark\n")
        keys = ("device", "torch", "cuda", "python", "gradtrace", "platform", "autocast")
        for key in (*keys, "optimizer"):
            if header[key] is not None:
                print(f"- {key}: {header[key]}")
        print(
            f"- method: {warmup} warm-up steps per config, then {rounds} rounds × {steps} timed "
            "steps per config (1 untimed step at each block start; order rotated per round)"
        )
        for m in models:
            print(f"- {m}: {SHAPES[device.type][m]}")
        print(flush=True)

        entries = []
        t0 = time.perf_counter()
        for m in models:
            entry = bench_model(
                m,
                device,
                configs,
                warmup,
                steps,
                rounds,
                tmp,
                clean,
                hwm_resettable,
                args.max_other_load,
                max_retries,
            )
            entries.append(entry)
            print(
                f"[{m}: {entry['seconds']:.1f} s, {len(entry['discarded_rounds'])} loaded "
                "round(s) discarded]",
                file=sys.stderr,
                flush=True,
            )
        costs = []
        if args.grad_stats:
            repeats = 20 if device.type == "cuda" else 5
            costs = [grad_stat_cost(build_workload(m, device), device, repeats) for m in models]
        total_s = time.perf_counter() - t0

    print("## Step time ratio to untraced (median of per-round ratios; their min–max)\n")
    print(summary_table(entries, configs))
    discards = ", ".join(f"{e['model']} {len(e['discarded_rounds'])}" for e in entries)
    print(
        f"\nRounds rerun because other processes took > {100 * args.max_other_load:.0f}% of "
        f"the CPU: {discards} (their ratios are in --json)."
    )
    print("\n## Detail\n")
    print(detail_table(entries, configs, device.type == "cuda"))
    if costs:
        print("\n## Gradient statistics per recorded step against the bandwidth limit\n")
        print(grad_stat_table(costs))
        print(
            "\nTime of the probe's own reductions on the model's gradients after a step "
            "(median of 5 batches of back-to-back runs). Limit = bytes they must move "
            "(norms: gradients; sampled step: gradients twice + parameters; "
            "update ratio: 6 × parameters) ÷ the device-to-device copy bandwidth measured "
            "here (read + write)."
        )
    rss_note = (
        "peak rise = VmHWM (reset before each block) minus VmRSS at block start"
        if hwm_resettable
        else "peak rise n/a: VmHWM could not be reset, and it is monotone"
    )
    print(
        f"\nHost RSS: {rss_note}; RSS growth = VmRSS after minus before each block, summed "
        f"over rounds. Absolute peak RSS is in --json. Total benchmark time {total_s:.1f} s."
    )

    if args.json is not None:
        raw = {
            "header": header,
            "total_seconds": total_s,
            "grad_stat_cost": costs,
            "models": [
                {
                    "model": e["model"],
                    "params": e["params"],
                    "seconds": e["seconds"],
                    "discarded_rounds": e["discarded_rounds"],
                    "configs": {
                        c: asdict(r) | {"median_ms": r.median_ms} for c, r in e["results"].items()
                    },
                }
                for e in entries
            ],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(raw, indent=2))
        print(f"raw results: {args.json}")
    return 0
