"""Small two-modality models and a deterministic training loop for optimizer tests."""

import torch
from torch import nn


class TwoTower(nn.Module):
    """Conv+linear encoder per modality (audio 1-channel, visual 3-channel), concat head."""

    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8))
        self.visual = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8))
        self.head = nn.Linear(16, n_classes)

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.audio(a), self.visual(v)], dim=1))

    def groups(self) -> list[dict]:
        return [
            {"params": list(self.audio.parameters()), "modality": "audio"},
            {"params": list(self.visual.parameters()), "modality": "visual"},
            {"params": list(self.head.parameters())},
        ]


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> TwoTower:
    torch.manual_seed(seed)
    return TwoTower().to(dtype)


def batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(6, 1, 8, 8, generator=gen).to(dtype),
            torch.randn(6, 3, 8, 8, generator=gen).to(dtype),
            torch.randint(0, 5, (6,), generator=gen),
        )
        for _ in range(n)
    ]


def loss_of(model: TwoTower, batch) -> torch.Tensor:
    a, v, y = batch
    return nn.functional.cross_entropy(model(a, v).float(), y)


def train(model, opt, data, *, ratios=None, scheduler=None, loss_scale=None, **step_kwargs) -> None:
    for batch in data:
        opt.zero_grad()
        loss = loss_of(model, batch)
        (loss * loss_scale if loss_scale else loss).backward()
        if ratios is not None:
            opt.step(ratios=ratios, **step_kwargs)
        else:
            opt.step(**step_kwargs)
        if scheduler is not None:
            scheduler.step()


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str = "") -> None:
    """``actual`` within ``rel`` times the scale (max |x|) of ``expected``, elementwise.

    Backends round differently in the last bits (torch's CPU kernels use fused
    multiply-adds, Triton contracts on GPU, g/pi amplifies a last-bit difference of pi);
    a tolerance relative to each tensor's scale states what "within 1e-6" means.
    """
    expected = expected.detach().float().cpu()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().float().cpu(), expected, rtol=0, atol=rel * (scale or 1.0),
                               msg=lambda m: f"{name}: {m}")


def assert_params_close(model, ref_model, rel: float = 1e-6) -> None:
    """Each parameter within ``rel`` of its tensor's scale in the reference run."""
    for (name, p_ref), p in zip(ref_model.named_parameters(), model.parameters()):
        assert_close_to_scale(p, p_ref, rel, name)
