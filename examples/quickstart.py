"""Quick start: swap torch.optim.AdamW for fastmask.AMSSPlus in a two-modality model.

Synthetic data: each class has a "visual" signal that is strong and an "audio"
signal that is weak, so joint training leans on the visual encoder. The balancer
measures each modality's mutual-information rate per batch from the forward pass, and
AMSS+ updates a smaller, importance-sampled part of the dominant encoder.
"""

import torch
from torch import nn

import fastmask


def make_data(n: int, gen: torch.Generator):
    y = torch.randint(0, 4, (n,), generator=gen)
    centres_a = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    centres_v = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    audio = 0.6 * centres_a[y] + torch.randn(n, 16, generator=gen)
    visual = 1.5 * centres_v[y] + torch.randn(n, 16, generator=gen)
    return audio, visual, y


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.visual = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.head = nn.Linear(64, 4)

    def forward(self, a, v):
        return self.head(torch.cat([self.audio(a), self.visual(v)], 1))


def train(optimizer_name: str) -> None:
    torch.manual_seed(0)
    model = Model()
    balancer = None
    if optimizer_name == "AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    else:
        # the swap: modality groups, and a balancer that gives each step its ratios
        balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
        groups = fastmask.modality_groups(model, {"audio": "audio", "visual": "visual"})
        opt = fastmask.AMSSPlus(groups, lr=3e-3, base="adamw", balancer=balancer)
    gen = torch.Generator().manual_seed(0)
    a, v, y = make_data(2048, gen)
    ta, tv, ty = make_data(1024, gen)
    asked: dict[str, float] = {}  # each modality's ratio, summed over the steps
    for epoch in range(3):
        for i in range(0, len(y), 64):
            loss = nn.functional.cross_entropy(model(a[i : i + 64], v[i : i + 64]), y[i : i + 64])
            if balancer is not None:
                balancer.observe(y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if balancer is not None:
                for modality in ("audio", "visual"):
                    asked[modality] = asked.get(modality, 0.0) + float(opt.ratio(modality))
    steps = 3 * len(range(0, len(y), 64))
    with torch.no_grad():
        zero = torch.zeros_like
        acc = (model(ta, tv).argmax(1) == ty).float().mean().item()
        acc_a = (model(ta, zero(tv)).argmax(1) == ty).float().mean().item()
        acc_v = (model(zero(ta), tv).argmax(1) == ty).float().mean().item()
    print(f"{optimizer_name:8s} fused acc {acc:.3f} | audio-only {acc_a:.3f} | visual-only {acc_v:.3f}")
    if isinstance(opt, fastmask.AMSSPlus):
        # the balancer sets each step's ratios: compare their mean with the fractions updated
        for modality, s in opt.stats().items():
            ratio = asked[modality] / steps if modality in asked else s["ratio"]
            print(f"  {modality:8s} mean ratio {ratio:.3f}  expected fraction {s['expected_fraction']:.3f}"
                  f"  realised {s['realised_fraction']:.3f}  skipped tensors {s['skipped_tensors']}")


if __name__ == "__main__":
    train("AdamW")
    train("AMSSPlus")
