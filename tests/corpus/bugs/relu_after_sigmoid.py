"""Gated encoder: nn.ReLU(inplace=True) overwrites the output torch.sigmoid saved for backward."""

import torch
from torch import nn


class GatedLayer(nn.Module):
    def __init__(self, width: int, inplace: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc(x))  # saved-by: node=SigmoidBackward0 module=encoder.layers.1
        return x * self.act(gate)  # expect: kind=inplace-write op=relu_ module=encoder.layers.1.act


class Encoder(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([GatedLayer(width, False), GatedLayer(width, True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.encoder = Encoder(16)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


torch.manual_seed(0)
model = Model()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(3):
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step} loss {loss.item():.4f}")
