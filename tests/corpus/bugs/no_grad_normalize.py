"""Normalising features in place under torch.no_grad(): no_grad still bumps the version."""

import torch
from torch import nn


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = torch.exp(self.proj(x))  # saved-by: node=ExpBackward0 module=tower.embedder
        with torch.no_grad():
            total = feats.sum(dim=-1, keepdim=True)
            feats.div_(total)  # expect: kind=inplace-write op=div_ module=tower.embedder
        return feats


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedder = Embedder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedder(x)


class Siamese(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tower = Tower()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (self.tower(a) * self.tower(b)).sum(dim=-1)


torch.manual_seed(13)
model = Siamese()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(3):
    a, b, same = torch.randn(16, 12), torch.randn(16, 12), torch.rand(16)
    loss = nn.functional.mse_loss(model(a, b), same)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step} loss {loss.item():.4f}")
