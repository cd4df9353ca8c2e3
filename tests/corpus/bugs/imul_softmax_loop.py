"""Masking class probabilities with `*=` in the training loop: softmax saved its output."""

import torch
from torch import nn

torch.manual_seed(3)
model = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 5))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
allowed = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
for step in range(3):
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
    probs = torch.softmax(model(x), dim=-1)  # saved-by: node=SoftmaxBackward0 module=training loop
    probs *= allowed  # expect: kind=inplace-write op=mul_ module=training loop
    loss = nn.functional.nll_loss(torch.log(probs + 1e-6), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step} loss {loss.item():.4f}")
