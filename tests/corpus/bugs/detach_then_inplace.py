"""A detached "target" modified in place: detach() shares storage and the version counter."""

import torch
from torch import nn

torch.manual_seed(14)
student = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 6))
optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
for step in range(3):
    x = torch.randn(32, 10)
    logits = student(x)
    probs = logits.softmax(dim=-1)  # saved-by: node=SoftmaxBackward0 module=training loop
    target = probs.detach()
    target.clamp_(min=0.05)  # expect: kind=inplace-write op=clamp_ module=training loop
    loss = -(target * torch.log(probs)).sum(dim=-1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step} loss {loss.item():.4f}")
