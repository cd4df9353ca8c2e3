"""nn.Sequential with Tanh followed by ReLU(inplace=True): the ReLU overwrites tanh's output.

Both ops run inside torch's own Sequential.forward, so the user's line is the one that calls
self.body; the module names nn.Sequential's children.
"""

import torch
from torch import nn


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(10, 32),
            nn.Tanh(),
            nn.ReLU(inplace=True),
            nn.Linear(32, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # expect: kind=inplace-write op=relu_ module=body.2


torch.manual_seed(1)
model = Classifier()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(3):
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step} loss {loss.item():.4f}")
