"""GRUCell and LSTMCell unrolled by hand; on CPU they use in-place ops internally (legal)."""

import torch
from _digest import digest_line
from torch import nn


class Tracker(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRUCell(4, 16)
        self.lstm = nn.LSTMCell(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        h = seq.new_zeros(seq.shape[1], 16)
        hc = (seq.new_zeros(seq.shape[1], 16), seq.new_zeros(seq.shape[1], 16))
        for x in seq:
            h = self.gru(x, h)
            hc = self.lstm(h, hc)
        return self.head(hc[0])


torch.manual_seed(23)
model = Tracker()
optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.5)
losses = []
for _ in range(3):
    seq, target = torch.randn(6, 4, 4), torch.randn(4, 2)
    loss = nn.functional.mse_loss(model(seq), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
print(digest_line(losses, [model], [optimizer]))
