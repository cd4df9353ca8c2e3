"""Shared by the DDP scripts: a tiny model under DistributedDataParallel on gloo (CPU)."""

import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32))
        self.gate = nn.Linear(32, 32)
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.head(torch.sigmoid(self.gate(h)))


# DDP_BACKEND=nccl runs on the rank's GPU (scripts/gpu_check.sh); the tests use gloo on CPU.
BACKEND = os.environ.get("DDP_BACKEND", "gloo")


def device() -> torch.device:
    if BACKEND == "nccl":
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def setup(
    model: type[nn.Module] = Net,
) -> tuple[int, DistributedDataParallel, torch.optim.Optimizer]:
    if BACKEND == "nccl":
        torch.cuda.set_device(device())
    dist.init_process_group(BACKEND)
    rank = dist.get_rank()
    torch.manual_seed(0)
    # DDP_BUCKET_VIEW=1: gradients are views into DDP's communication buckets.
    bucket_view = os.environ.get("DDP_BUCKET_VIEW") == "1"
    ddp = DistributedDataParallel(model().to(device()), gradient_as_bucket_view=bucket_view)
    return rank, ddp, torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(16, 8, generator=generator), torch.randn(16, 1, generator=generator)
    return x.to(device()), y.to(device())


def save_weights(ddp: DistributedDataParallel, rank: int) -> None:
    """Every rank's final weights, for the bitwise comparison with and without gradtrace."""
    out = os.environ.get("DDP_WEIGHTS_OUT")
    if out:
        torch.save(ddp.module.state_dict(), f"{out}.rank{rank}.pt")


def teardown() -> None:
    """Destroy the process group while the interpreter is whole, DDP already freed.

    Left to interpreter finalization, gloo's worker threads can abort the process with
    "terminate called without an active exception" (pytorch/pytorch#179291): a flaky
    exit status that has nothing to do with the test.
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
