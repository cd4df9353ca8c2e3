"""Attention that masks padded keys with masked_fill_ on the softmax output softmax saved."""

import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        attn = scores.softmax(dim=-1)  # saved-by: node=SoftmaxBackward0 module=layer.attn
        pad = pad[:, None, :]
        attn.masked_fill_(pad, 0)  # expect: kind=inplace-write op=masked_fill_ module=layer.attn
        return self.out(attn @ v)


class Layer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = Attention(dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.attn(x, pad))


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.layer = Layer(16)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(tokens), pad))


torch.manual_seed(6)
model = Tagger()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step in range(3):
    tokens, tags = torch.randint(0, 50, (4, 7)), torch.randint(0, 4, (4, 7))
    pad = torch.zeros(4, 7, dtype=torch.bool)
    pad[:, 5:] = True
    logits = model(tokens, pad)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), tags.flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step} loss {loss.item():.4f}")
