"""Temperature scaling of an activation through `.data` inside a nested module's forward.

exp saved its output; the .data write changes it without a version bump: wrong gradients.
"""

import torch
from torch import nn


class Scorer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = torch.exp(self.proj(x))  # saved-by: node=ExpBackward0 module=heads.0.scorer
        energy.data.mul_(0.5)  # expect: kind=silent-overwrite op=mul_ module=heads.0.scorer
        return energy


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scorer = Scorer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scorer(x).sum(dim=-1, keepdim=True)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList([Head()])
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads[0](x) + self.bias


torch.manual_seed(12)
model = Model()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
for step in range(3):
    x, y = torch.randn(16, 10) * 0.1, torch.randn(16, 1)
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step} loss {loss.item():.6f}")
