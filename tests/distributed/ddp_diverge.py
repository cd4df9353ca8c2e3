"""One rank scales its gradient after DDP's all-reduce: the ranks' weights drift apart."""

from _ddp import batch, setup, teardown
from torch import nn


def main() -> None:
    rank, ddp, optimizer = setup()
    for step in range(5):
        x, y = batch(rank, step)
        optimizer.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        if rank == 1 and step == 2:
            ddp.module.head.weight.grad.mul_(3.0)  # a rank-dependent write into .grad
        optimizer.step()


main()
teardown()
