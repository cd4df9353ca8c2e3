"""The same WGAN weight clipping through `.data`: no error, but backward uses clipped weights.

Writes through .data skip the version counter, so PyTorch computes wrong gradients silently.
"""

import torch
from torch import nn


class Critic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(2, 32)
        self.score = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.hidden(x))
        return self.score(h)  # saved-by: node=AddmmBackward0 module=score parameter=score.weight


torch.manual_seed(11)
critic = Critic()
optimizer = torch.optim.RMSprop(critic.parameters(), lr=5e-4)
for step in range(3):
    real, fake = torch.randn(32, 2) + 1.0, torch.randn(32, 2)
    loss = critic(fake).mean() - critic(real).mean()
    optimizer.zero_grad()
    for param in critic.parameters():
        weights = param.data
        weights.clamp_(-0.05, 0.05)  # expect: kind=silent-overwrite op=clamp_ module=training loop
    loss.backward()
    optimizer.step()
    print(f"step {step} loss {loss.item():.4f}")
