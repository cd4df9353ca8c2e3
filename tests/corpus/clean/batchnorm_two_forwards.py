"""Two augmented views through one BatchNorm network before a single backward (SimCLR-style).

The second forward updates the running statistics in place: legal, nothing saved them for
the gradient.
"""

import torch
from _digest import digest_line
from torch import nn


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(inplace=True), nn.Linear(32, 8)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(x), dim=-1)


torch.manual_seed(22)
encoder = Encoder()
optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
losses = []
for _ in range(4):
    x = torch.randn(16, 10)
    view_a = x + 0.1 * torch.randn_like(x)
    view_b = x + 0.1 * torch.randn_like(x)
    za, zb = encoder(view_a), encoder(view_b)
    logits = za @ zb.t() / 0.5
    loss = nn.functional.cross_entropy(logits, torch.arange(16))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
print(digest_line(losses, [encoder], [optimizer]))
