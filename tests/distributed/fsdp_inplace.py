"""FSDP2 with an in-place bug inside a sharded block: backward fails on every rank."""

import torch
import torch.distributed as dist
from _sharded import MLP, batch, setup
from torch import nn
from torch.distributed.fsdp import fully_shard


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.proj(h))
        gate.mul_(0.5)  # expect: kind=inplace-write op=mul_
        return gate


def main() -> None:
    rank = setup()
    model = MLP()
    model.mid = Block()
    for layer in (model.up, model.mid, model.down):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = batch(rank, 0)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


try:
    main()
finally:
    dist.destroy_process_group()
