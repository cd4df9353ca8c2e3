"""The benchmark's model zoo: each model with its optimizer and one training step, at a size
for the device (GPU sizes GPT-2-small-like; CPU sizes scaled down to run in seconds)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("mlp", "cnn", "gpt", "policy")


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
