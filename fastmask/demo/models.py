"""The demo's model: one encoder per modality (an MLP for feature vectors, a small CNN for images)
and a concat-fusion linear head."""

from __future__ import annotations

import torch
from torch import nn


def encoder(shape: tuple[int, ...], hidden: int) -> nn.Module:
    """One modality's encoder, to ``hidden`` features: an MLP (d -> hidden -> hidden, ReLU) for
    feature vectors (d,); a small CNN for images (1, H, W): two 3x3 conv blocks (8 and 16
    channels, ReLU, 2x2 max-pool), then a linear layer to ``hidden`` with ReLU."""
    if len(shape) == 1:
        return nn.Sequential(nn.Linear(shape[0], hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
    if len(shape) != 3:
        raise ValueError(f"an encoder takes feature vectors (d,) or images (C, H, W), got shape {shape}")
    channels, height, width = shape
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * (height // 4) * (width // 4), hidden), nn.ReLU(),
    )


class FusionNet(nn.Module):
    """One encoder per modality (``encoder``: MLP or CNN by its input's shape), concat-fusion
    linear head."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], n_classes: int, hidden: int) -> None:
        super().__init__()
        self.order = list(shapes)
        self.encoders = nn.ModuleDict({m: encoder(shape, hidden) for m, shape in shapes.items()})
        self.head = nn.Linear(hidden * len(shapes), n_classes)

    def features(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.encoders[m](x[m]) for m in self.order}

    def fuse(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(torch.cat([feats[m] for m in self.order], dim=1))

    def groups(self) -> list[dict]:
        return [{"params": list(self.encoders[m].parameters()), "modality": m} for m in self.order] + [
            {"params": list(self.head.parameters())}
        ]
