"""Clipping large rates with boolean-mask assignment (index_put_) on exp's saved output."""

import torch
from torch import nn

torch.manual_seed(5)
model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 1))
optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
for step in range(3):
    x, counts = torch.randn(64, 6), torch.poisson(torch.full((64, 1), 3.0))
    rate = torch.exp(model(x))  # saved-by: node=ExpBackward0 module=training loop
    rate[rate > 10.0] = 10.0  # expect: kind=inplace-write op=index_put_ module=training loop
    loss = (rate - counts * torch.log(rate)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step} loss {loss.item():.4f}")
