"""DDP around a `torch.compile`d model (DDPOptimizer splits graphs at buckets): no findings.

DDP_COMPILE_BACKEND picks the compiler backend (default inductor, as users run it).
"""

import os

import torch
from _ddp import Net, batch, save_weights, setup, teardown
from torch import nn


def compiled() -> nn.Module:
    return torch.compile(Net(), backend=os.environ.get("DDP_COMPILE_BACKEND", "inductor"))


def main() -> None:
    rank, ddp, optimizer = setup(compiled)
    for step in range(5):
        x, y = batch(rank, step)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        optimizer.step()
        if rank == 0:
            print(f"step {step} loss {loss.item():.6f}", flush=True)
    save_weights(ddp, rank)


main()
teardown()
