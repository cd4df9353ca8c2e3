"""Residual block that adds the skip path with `+=` onto the tanh output tanh saved."""

import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.skip = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))  # saved-by: node=TanhBackward0 module=backbone.blocks.0
        h += self.skip(x)  # expect: kind=inplace-write op=add_ module=backbone.blocks.0
        return h


class Backbone(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(ResidualBlock(width), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone(12)
        self.head = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


torch.manual_seed(2)
model = Regressor()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step in range(3):
    x, y = torch.randn(24, 12), torch.randn(24, 1)
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step} loss {loss.item():.4f}")
