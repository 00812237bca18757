"""A GAN iteration steps two optimizers (discriminator, then generator): one step per iteration."""

import torch
from common import finish, seed_everything
from torch import nn

seed_everything()
generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
discriminator = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
opt_d = torch.optim.Adam(discriminator.parameters(), lr=1e-3, betas=(0.5, 0.999))
bce = nn.BCEWithLogitsLoss()
data = torch.Generator().manual_seed(1)
iterations = 30
for _ in range(iterations):
    real = torch.randn(16, 8, generator=data) + 2.0
    noise = torch.randn(16, 4, generator=data)
    fake = generator(noise)
    opt_d.zero_grad()
    loss_d = bce(discriminator(real), torch.ones(16, 1)) + bce(discriminator(fake.detach()), torch.zeros(16, 1))
    loss_d.backward()
    opt_d.step()
    opt_g.zero_grad()
    loss_g = bce(discriminator(fake), torch.ones(16, 1))
    loss_g.backward()
    opt_g.step()
print(f"discriminator loss {loss_d.item().hex()}", flush=True)
finish(loss_g, iterations)
