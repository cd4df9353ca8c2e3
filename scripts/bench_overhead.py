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
import contextlib
import cProfile
import functools
import importlib
import io
import json
import math
import os
import platform
import pstats
import resource
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gradtrace.session as gt_session
from gradtrace import _native
from gradtrace.probes import _torch_compat
from gradtrace.probes.grads import BOUNDED_MODULES
from gradtrace.session import Session

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
MODELS = ("mlp", "cnn", "gpt", "policy")


# --------------------------------------------------------------------------------------------
# Models


class MLP(nn.Module):
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: `out += identity` then ReLU(inplace=True)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...], blocks: int, classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, width in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, width, 2 if (i > 0 and b == 0) else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # weight tying, as in GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# Shapes: GPU sizes are GPT-2-small-like; CPU sizes are scaled down to run in seconds.
SHAPES: dict[str, dict[str, dict[str, Any]]] = {
    "cuda": {
        "mlp": {"width": 4096, "batch": 256, "classes": 1000},
        "cnn": {"widths": (64, 128, 256), "blocks": 2, "batch": 64, "image": 32, "classes": 100},
        "gpt": {"vocab": 50257, "seq": 256, "d": 768, "heads": 12, "layers": 12, "batch": 8},
        "policy": {"obs": 8, "hidden": 64, "actions": 4, "calls": 32},
    },
    "cpu": {
        "mlp": {"width": 512, "batch": 128, "classes": 100},
        "cnn": {"widths": (16, 32, 64), "blocks": 1, "batch": 16, "image": 32, "classes": 10},
        "gpt": {"vocab": 1024, "seq": 64, "d": 128, "heads": 4, "layers": 2, "batch": 8},
        "policy": {"obs": 8, "hidden": 64, "actions": 4, "calls": 32},
    },
}


@dataclass
class Workload:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], None]
    params: int
    shape: dict[str, Any]


def build_workload(name: str, device: torch.device) -> Workload:
    shape = SHAPES[device.type][name]
    gen = torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        model: nn.Module = MLP(shape["width"], shape["classes"])
        x = torch.randn(shape["batch"], shape["width"], generator=gen)
        y = torch.randint(0, shape["classes"], (shape["batch"],), generator=gen)
    elif name == "cnn":
        model = SmallResNet(tuple(shape["widths"]), shape["blocks"], shape["classes"])
        x = torch.randn(shape["batch"], 3, shape["image"], shape["image"], generator=gen)
        y = torch.randint(0, shape["classes"], (shape["batch"],), generator=gen)
    elif name == "gpt":
        model = GPT(shape["vocab"], shape["seq"], shape["d"], shape["heads"], shape["layers"])
        tokens = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"] + 1), generator=gen)
        x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    elif name == "policy":
        return _policy_workload(shape, device)
    else:
        raise ValueError(name)
    model = model.to(device).train()
    x, y = x.to(device), y.to(device)
    # A small learning rate keeps 100s of steps on fixed data free of NaNs (anomaly mode raises).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    use_autocast = device.type == "cuda"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            out = model(x)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        optimizer.step()

    params = sum(p.numel() for p in model.parameters())
    return Workload(name, model, optimizer, step, params, dict(shape))


class Policy(nn.Module):
    """A small actor as REINFORCE uses it: called once per environment step."""

    def __init__(self, obs: int, hidden: int, actions: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(obs, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.act = nn.ReLU()
        self.head = nn.Linear(hidden, actions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.body(x)))


def _policy_workload(shape: dict[str, Any], device: torch.device) -> Workload:
    """Many tiny forwards per optimizer step: the case where per-call costs dominate."""
    torch.manual_seed(0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    model = Policy(shape["obs"], shape["hidden"], shape["actions"]).to(device).train()
    observations = torch.randn(shape["calls"], 1, shape["obs"], generator=gen).to(device)
    actions = torch.randint(0, shape["actions"], (shape["calls"], 1), generator=gen).to(device)
    returns = torch.linspace(1.0, 0.0, shape["calls"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        log_probs = []
        for t in range(shape["calls"]):
            logits = model(observations[t])
            log_probs.append(F.log_softmax(logits, dim=-1).gather(1, actions[t : t + 1]))
        loss = -(torch.cat(log_probs).squeeze(1) * returns).sum()
        loss.backward()
        optimizer.step()

    params = sum(p.numel() for p in model.parameters())
    return Workload("policy", model, optimizer, step, params, dict(shape))


# --------------------------------------------------------------------------------------------
# Configurations and global-state hygiene


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
    core.configure(lambda code: True, lambda packed, version: None, True)
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
        "gradtrace_active": gt_session._active is not None,
    }


# --------------------------------------------------------------------------------------------
# Memory


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib / 1024


def hwm_mib() -> float:
    """Peak RSS so far (monotone unless `reset_hwm` works)."""
    kib = _proc_status_kib("VmHWM")
    if kib is None:  # not Linux: getrusage is KiB on Linux, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib = maxrss // 1024 if sys.platform == "darwin" else maxrss
    return kib / 1024


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Machine load: CPU time other processes took while a block ran (a shared box is noisy)


def _machine_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """Share of the machine's CPU capacity used by anything but this process (incl. steal)."""

    def __enter__(self) -> LoadMeter:
        self.share: float | None = None
        self._busy = _machine_busy_s()
        times = os.times()
        self._own = times.user + times.system
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy = _machine_busy_s()
        times = os.times()
        wall = time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return
        foreign = (busy - self._busy) - (times.user + times.system - self._own)
        self.share = max(0.0, foreign / (wall * (os.cpu_count() or 1)))


# --------------------------------------------------------------------------------------------
# Timing


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


def assert_clean(expected: dict[str, Any], where: str) -> None:
    now = global_state()
    if now != expected:
        diff = {k: (expected.get(k), v) for k, v in now.items() if expected.get(k) != v}
        raise SystemExit(f"torch global state changed after {where}: {diff}")


# --------------------------------------------------------------------------------------------
# Reporting


def gradtrace_revision() -> str:
    """Commit of the gradtrace checkout being measured, marked dirty if it has edits."""
    import subprocess

    root = Path(gt_session.__file__).resolve().parent.parent
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


# --------------------------------------------------------------------------------------------
# Gradient statistics against the memory-bandwidth limit


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


# --------------------------------------------------------------------------------------------
# Profile mode


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
    root = str(Path(gt_session.__file__).resolve().parent)
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
    return out.getvalue()


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


# --------------------------------------------------------------------------------------------


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


if __name__ == "__main__":
    sys.exit(main())
