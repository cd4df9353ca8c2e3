"""A clean DDP training loop: no findings, same weights as without gradtrace."""

from _ddp import batch, save_weights, setup, teardown
from torch import nn


def main() -> None:
    rank, ddp, optimizer = setup()
    for step in range(6):
        x, y = batch(rank, step)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        optimizer.step()
        if rank == 0:
            print(f"step {step} loss {loss.item():.6f}")
    save_weights(ddp, rank)


main()
teardown()
