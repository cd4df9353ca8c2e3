"""Shared by the FSDP2 and tensor-parallel scripts: gloo (CPU), a small MLP, AdamW.

Each script prints `step N loss X` on rank 0 and, with SHARDED_NORMS_OUT set, rank 0 writes
every parameter's gradient norm per step as `full_tensor()` gives it (gathered over ranks),
for the test to compare with gradtrace's combination of the ranks' shards.
"""

import gc
import json
import os

import torch
import torch.distributed as dist
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 32)
        self.mid = nn.Linear(32, 32)
        self.down = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.mid(torch.relu(self.up(x)))))


def setup() -> int:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    return dist.get_rank()


def batch(rank: int, step: int, *, per_rank: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """FSDP2 trains on a different batch per rank; tensor parallel on the same one."""
    generator = torch.Generator().manual_seed(1000 * step + (rank if per_rank else 0))
    return torch.randn(16, 8, generator=generator), torch.randn(16, 1, generator=generator)


def train(model: nn.Module, rank: int, *, per_rank: bool, steps: int = 5) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    norms: dict[str, list[float]] = {}
    for step in range(steps):
        x, y = batch(rank, step, per_rank=per_rank)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        for name, param in model.named_parameters():
            grad = param.grad
            whole = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
            norms.setdefault(name, []).append(whole.norm().item())
        optimizer.step()
        if rank == 0:
            print(f"step {step} loss {loss.item():.6f}", flush=True)
    out = os.environ.get("SHARDED_NORMS_OUT")
    if out and rank == 0:
        with open(out, "w") as file:
            json.dump(norms, file)


def teardown() -> None:
    """Destroy the process group while the interpreter is whole (see _ddp.teardown)."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
