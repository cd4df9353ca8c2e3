"""DDP with an in-place bug in the model's forward: backward fails on every rank."""

import torch
import torch.distributed as dist
from _ddp import Net, batch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class Buggy(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        gate = torch.sigmoid(self.gate(h))  # saved-by: node=SigmoidBackward0 module=Buggy
        gate.mul_(0.5)  # expect: kind=inplace-write op=mul_
        return self.head(gate)


dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
ddp = DistributedDataParallel(Buggy())
optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
for step in range(3):
    x, y = batch(rank, step)
    optimizer.zero_grad()
    nn.functional.mse_loss(ddp(x), y).backward()
    optimizer.step()
dist.destroy_process_group()
