"""MLP trained with AdamW(foreach=True), with an EMA copy of the weights updated after step()."""

import copy

import torch
from _digest import digest_line
from torch import nn

torch.manual_seed(21)
model = nn.Sequential(nn.Linear(16, 64), nn.SiLU(), nn.Dropout(0.1), nn.Linear(64, 4))
ema = copy.deepcopy(model).requires_grad_(False)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, foreach=True)
losses = []
for _ in range(5):
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5, foreach=True)
    optimizer.step()
    with torch.no_grad():
        for averaged, param in zip(ema.parameters(), model.parameters(), strict=True):
            averaged.mul_(0.99).add_(param, alpha=0.01)
    losses.append(loss.item())
print(digest_line(losses, [model, ema], [optimizer]))
