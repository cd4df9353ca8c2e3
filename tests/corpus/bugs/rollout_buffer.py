"""A rollout written step by step into one tensor: `traj[:, t] = f(traj[:, t - 1])`.

Each assignment moves the version counter all of `traj`'s slices share, so the slice the
dynamics model's matmul saved one step earlier fails the check in backward.
"""

import torch
from torch import nn


class Dynamics(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(6, 6)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.cell(state))  # saved-by: node=AddmmBackward0 module=cell


torch.manual_seed(16)
model = Dynamics()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for step in range(2):
    traj = torch.zeros(8, 5, 6)
    traj[:, 0] = torch.randn(8, 6)
    for t in range(1, 5):
        nxt = model(traj[:, t - 1])
        traj[:, t] = nxt  # expect: kind=inplace-write op=copy_ module=training loop
    loss = traj.pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step} loss {loss.item():.4f}")
