"""DDP with an in-place bug in the model's forward: backward fails on every rank."""

import traceback

import torch
import torch.distributed as dist
from _ddp import Net, batch, setup
from torch import nn


class Buggy(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        gate = torch.sigmoid(self.gate(h))  # saved-by: node=SigmoidBackward0 module=Buggy
        gate.mul_(0.5)  # expect: kind=inplace-write op=mul_
        return self.head(gate)


def main() -> None:
    rank, ddp, optimizer = setup(Buggy)
    for step in range(3):
        x, y = batch(rank, step)
        optimizer.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        optimizer.step()


try:
    main()
except RuntimeError as error:
    # Free DDP before its process group goes (see _ddp.teardown); the traceback is intact.
    traceback.clear_frames(error.__traceback__)
    raise
finally:
    dist.destroy_process_group()
