"""A block that wraps `forward` in its own `__call__` (seen in research code): module hooks
never fire for it, so the write inside must be traced to the block from the running code.
"""

import torch
from torch import nn


class GatedBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.proj(x))
        gate.mul_(0.5)  # expect: kind=inplace-write op=mul_ module=blocks.1
        return x + gate


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([GatedBlock(12), GatedBlock(12)])
        self.head = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


torch.manual_seed(17)
model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
for step in range(2):
    x, y = torch.randn(8, 12), torch.randn(8, 1)
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step} loss {loss.item():.4f}")
