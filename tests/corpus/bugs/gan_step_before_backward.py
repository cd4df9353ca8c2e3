"""GAN with two optimizers: the discriminator steps before the generator's backward.

The generator loss ran through the discriminator, which saved its weights for backward;
d_opt.step() then updates those weights in place.
"""

import torch
from torch import nn


class Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(2, 32)
        self.out = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.leaky_relu(self.hidden(x), 0.2)
        return self.out(h)  # saved-by: node=AddmmBackward0 module=out parameter=out.weight


torch.manual_seed(7)
gen, disc = Generator(), Discriminator()
g_opt = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
d_opt = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
bce = nn.BCEWithLogitsLoss()
for step in range(3):
    real = torch.randn(32, 2) * 0.5 + 1.0
    fake = gen(torch.randn(32, 4))
    ones, zeros = torch.ones(32, 1), torch.zeros(32, 1)
    d_loss = bce(disc(real), ones) + bce(disc(fake.detach()), zeros)
    g_loss = bce(disc(fake), ones)
    d_opt.zero_grad()
    d_loss.backward()
    d_opt.step()  # expect: kind=inplace-write op=addcdiv_ module=Adam.step
    g_opt.zero_grad()
    g_loss.backward()
    g_opt.step()
    print(f"step {step} d_loss {d_loss.item():.4f} g_loss {g_loss.item():.4f}")
