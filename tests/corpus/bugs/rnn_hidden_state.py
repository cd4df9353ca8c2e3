"""A GRU-style cell whose hidden state lives in one preallocated buffer, updated with copy_.

Each time step's cell saves the state it read (for the gate products); copying the new state
into the same buffer overwrites it before backward.
"""

import torch
from torch import nn


class MinGRUCell(nn.Module):
    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.update = nn.Linear(inputs + hidden, hidden)
        self.candidate = nn.Linear(inputs + hidden, hidden)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        xh = torch.cat([x, h], dim=-1)
        z = torch.sigmoid(self.update(xh))
        n = torch.tanh(self.candidate(xh))
        return (1 - z) * h + z * n  # saved-by: node=MulBackward0 module=encoder.cell


class SequenceEncoder(nn.Module):
    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.cell = MinGRUCell(inputs, hidden)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        state = seq.new_zeros(seq.shape[1], self.hidden)
        for x in seq:
            state.copy_(self.cell(x, state))  # expect: kind=inplace-write op=copy_ module=encoder
        return state


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = SequenceEncoder(3, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(seq))


torch.manual_seed(9)
model = Model()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(3):
    seq, target = torch.randn(5, 8, 3), torch.randn(8, 1)
    loss = nn.functional.mse_loss(model(seq), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step} loss {loss.item():.4f}")
