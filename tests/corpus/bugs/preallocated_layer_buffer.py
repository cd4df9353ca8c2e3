"""Layer outputs written into slices of one preallocated buffer.

`h[i + 1] = ...` bumps the version counter every slice of `h` shares, so the slice `h[i]`
that the next layer's matmul saved is "modified" although its bytes are not.
"""

import torch
from torch import nn


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(len(self.layers) + 1, *x.shape)
        h[0] = x
        for i, layer in enumerate(self.layers):
            h[i + 1] = torch.tanh(layer(h[i]))  # expect: kind=inplace-write op=copy_ module=Stack
        return h[-1]


torch.manual_seed(15)
model = Stack()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(2):
    loss = model(torch.randn(4, 8)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step} loss {loss.item():.4f}")
