"""A Lightning Trainer fitting a small MLP on random regression data (AdamW, closure-based step)."""

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.last_loss = loss.detach()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


L.seed_everything(0)
generator = torch.Generator().manual_seed(0)
x = torch.randn(4096, 32, generator=generator)
data = TensorDataset(x, x[:, :4].sum(dim=1, keepdim=True))
model = Regressor()
trainer = L.Trainer(
    max_steps=200, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
)
trainer.fit(model, DataLoader(data, batch_size=64, shuffle=True))
print("final loss", float(model.last_loss).hex())
