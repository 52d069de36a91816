"""Quick start: swap torch.optim.AdamW for fastmask.AMSSPlus in a two-modality model.

Synthetic data: each class has a "visual" signal that is strong and an "audio"
signal that is weak, so joint training leans on the visual encoder. AMSS+ measures
each modality's mutual-information rate per batch and updates a smaller,
importance-sampled part of the dominant encoder.
"""

import torch
from torch import nn

import fastmask
from fastmask import significance as sig


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

    def features(self, a, v):
        return {"audio": self.audio(a), "visual": self.visual(v)}

    def forward(self, a, v):
        return self.head(torch.cat(list(self.features(a, v).values()), 1))


def train(optimizer_name: str) -> None:
    torch.manual_seed(0)
    model = Model()
    groups = [
        {"params": model.audio.parameters(), "modality": "audio"},
        {"params": model.visual.parameters(), "modality": "visual"},
        {"params": model.head.parameters()},
    ]
    if optimizer_name == "AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    else:
        # the swap: same groups, one extra key per group, ratios per step
        opt = fastmask.AMSSPlus(groups, lr=3e-3, base="adamw")
    gen = torch.Generator().manual_seed(0)
    a, v, y = make_data(2048, gen)
    ta, tv, ty = make_data(1024, gen)
    for epoch in range(3):
        for i in range(0, len(y), 64):
            opt.zero_grad()
            feats = model.features(a[i : i + 64], v[i : i + 64])
            logits = model.head(torch.cat(list(feats.values()), 1))
            nn.functional.cross_entropy(logits, y[i : i + 64]).backward()
            if isinstance(opt, fastmask.AMSSPlus):
                # the dominant modality (higher mutual-information rate) updates a smaller fraction
                uni = sig.unimodal_logits(model.head, feats)
                mir = sig.mutual_information_rate(uni, y[i : i + 64], feats)
                opt.step(ratios=sig.amss_ratios(mir, temperature=0.2))
            else:
                opt.step()
    with torch.no_grad():
        zero = torch.zeros_like
        acc = (model(ta, tv).argmax(1) == ty).float().mean().item()
        acc_a = (model(ta, zero(tv)).argmax(1) == ty).float().mean().item()
        acc_v = (model(zero(ta), tv).argmax(1) == ty).float().mean().item()
    print(f"{optimizer_name:8s} fused acc {acc:.3f} | audio-only {acc_a:.3f} | visual-only {acc_v:.3f}")
    if isinstance(opt, fastmask.AMSSPlus):
        for modality, s in opt.stats().items():
            print(f"  {modality:8s} ratio {s['ratio']:.2f}  expected fraction {s['expected_fraction']:.3f}"
                  f"  realised {s['realised_fraction']:.3f}  skipped tensors {s['skipped_tensors']}")


if __name__ == "__main__":
    train("AdamW")
    train("AMSSPlus")
