"""AMSS+ with fastmask.Balancer inside the Hugging Face Trainer.

The model takes ``labels=`` (the Hugging Face convention) and returns its loss; the balancer
reads the labels from there (``labels_from=model``), so the Trainer, which calls
``optimizer.step()`` with no arguments, needs nothing else. Two ways to hand over the optimizer:
``optimizers=(opt, None)``, or ``optimizer_cls_and_kwargs`` with the modality groups as its
``params`` (the Trainer would otherwise build two weight-decay groups, with no modality).

    python examples/hf_trainer_balancer.py
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments

import fastmask


class Samples(torch.utils.data.Dataset):
    """Four classes; the visual signal is strong, the audio one weak (visual dominates)."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=gen)
        centres_a = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
        centres_v = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
        self.audio = 0.6 * centres_a[self.labels] + torch.randn(n, 16, generator=gen)
        self.visual = 1.5 * centres_v[self.labels] + torch.randn(n, 16, generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"audio": self.audio[i], "visual": self.visual[i], "labels": self.labels[i]}


class AudioVisualModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.visual = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.head = nn.Linear(64, 4)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.head(torch.cat([self.audio(audio), self.visual(visual)], dim=1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def main(max_steps: int = 60, via: str = "optimizers", accumulate: int = 2) -> Trainer:
    torch.manual_seed(0)
    model = AudioVisualModel()
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head, labels_from=model)
    groups = fastmask.modality_groups(model, {"audio": "audio", "visual": "visual"})
    kwargs = {"lr": 3e-3, "balancer": balancer}
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="fastmask-hf-"), max_steps=max_steps,
                             per_device_train_batch_size=32, gradient_accumulation_steps=accumulate,
                             max_grad_norm=1.0, learning_rate=3e-3, use_cpu=True, report_to="none",
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    if via == "optimizers":
        trainer = Trainer(model=model, args=args, train_dataset=Samples(2048, seed=0),
                          optimizers=(fastmask.AMSSPlus(groups, **kwargs), None))
    else:
        trainer = Trainer(model=model, args=args, train_dataset=Samples(2048, seed=0),
                          optimizer_cls_and_kwargs=(fastmask.AMSSPlus, {"params": groups, **kwargs}))
    trainer.train()
    return trainer


if __name__ == "__main__":
    trainer = main()
    for modality, s in trainer.optimizer.optimizer.stats().items():
        print(f"{modality:8s} ratio {s['ratio']:.2f}  expected fraction {s['expected_fraction']:.3f}"
              f"  realised {s['realised_fraction']:.3f}")
