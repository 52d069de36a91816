"""AMSS+ with fastmask.Balancer inside PyTorch Lightning.

``configure_optimizers`` returns the optimizer, built with ``balancer=``; ``training_step``
calls ``balancer.observe(labels)`` after the forward pass. Lightning runs the forward pass
inside ``optimizer.step(closure)``; the optimizer reads the balancer after the closure, so each
step uses the batches it just saw (all of them, with gradient accumulation).

    python examples/lightning_balancer.py
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastmask


def make_data(n: int, seed: int) -> TensorDataset:
    """Four classes; the visual signal is strong, the audio one weak (visual dominates)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    centres_a = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    centres_v = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    audio = 0.6 * centres_a[y] + torch.randn(n, 16, generator=gen)
    visual = 1.5 * centres_v[y] + torch.randn(n, 16, generator=gen)
    return TensorDataset(audio, visual, y)


class AudioVisual(L.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.visual = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.head = nn.Linear(64, 4)
        self.lr = lr
        self.balancer: fastmask.Balancer | None = None

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.audio(audio), self.visual(visual)], dim=1))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        audio, visual, y = batch
        loss = F.cross_entropy(self(audio, visual), y)
        self.balancer.observe(y)
        return loss

    def configure_optimizers(self) -> fastmask.AMSSPlus:
        self.balancer = fastmask.Balancer({"audio": self.audio, "visual": self.visual}, self.head)
        groups = fastmask.modality_groups(self, {"audio": "audio", "visual": "visual"})
        # unscale_in_step=False: Lightning clips gradients under AMP only if the optimizer leaves
        # unscaling to the GradScaler (as it does for torch's fused Adam)
        return fastmask.AMSSPlus(groups, lr=self.lr, balancer=self.balancer, unscale_in_step=False)


def main(max_steps: int = 60, accumulate: int = 2, precision: str = "bf16-mixed") -> tuple[AudioVisual, L.Trainer]:
    torch.manual_seed(0)
    module = AudioVisual()
    trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, gradient_clip_val=1.0,
                        precision=precision, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(make_data(2048, seed=0), batch_size=32, shuffle=True))
    return module, trainer


if __name__ == "__main__":
    module, trainer = main()
    for modality, s in trainer.optimizers[0].stats().items():
        print(f"{modality:8s} ratio {s['ratio']:.2f}  expected fraction {s['expected_fraction']:.3f}"
              f"  realised {s['realised_fraction']:.3f}")
