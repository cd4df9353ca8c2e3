"""In-place writes that are all legal: nothing autograd saved is ever written.

`+=` on a Linear's output (addmm saves its inputs, not its output), ReLU(inplace=True) after
it, slice assignment on a clone, a masked reset of a recurrent state that is carried as a
new tensor, and WGAN weight clipping placed correctly: after optimizer.step().
"""

import torch
from _digest import digest_line
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h += x
        h = self.act(h)
        out = torch.sigmoid(h).clone()
        out[:, 0] = 0
        return out


torch.manual_seed(24)
model = nn.Sequential(Block(12), Block(12), nn.Linear(12, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True)
losses = []
for _ in range(4):
    x, y = torch.randn(16, 12), torch.randn(16, 1)
    pred = model(x)
    residual = pred - y
    residual[residual.abs() > 3.0] = 3.0
    loss = (residual**2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for param in model.parameters():
        param.data.clamp_(-0.5, 0.5)
    losses.append(loss.item())
print(digest_line(losses, [model], [optimizer]))
