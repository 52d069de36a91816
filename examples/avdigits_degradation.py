"""How AV digits' degradation was chosen: each modality's own test accuracy under candidate
degradations, before any balancing method is run (fastmask.demo.data.AVDIGITS_DEGRADATION).

For each candidate: the demo's encoder for that modality (fastmask.demo.encoder) with a linear
head, SGD (lr 0.05, momentum 0.9, weight decay 1e-4), batches of 64, at most 30 epochs with
early stopping on validation accuracy (patience 6), seed 0. The clips are synthesised once
(about a minute) and the audio candidates differ only in the noise added to them.

    python examples/avdigits_degradation.py [--json docs/avdigits_degradation_results.json]

Prints each candidate's test accuracy and writes them, with the protocol, to the JSON file.
"""

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

from fastmask.demo import avdigits
from fastmask.demo.data import remove_energy
from fastmask.demo import encoder

IMAGE_ENERGY_REMOVED = (0.0, 0.75, 0.9, 0.95, 0.98)
AUDIO_SNR_DB = (None, 0.0, -10.0, -15.0, -20.0)


def accuracy(x: torch.Tensor, labels: torch.Tensor, split: torch.Tensor, seed: int = 0) -> float:
    """Test accuracy of encoder + linear head on one modality ``x`` [N, 1, H, W]."""
    torch.manual_seed(seed)
    x = (x - x[split == 0].mean()) / x[split == 0].std()
    model = nn.Sequential(encoder(tuple(x.shape[1:]), 64), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    train, val, test = (torch.nonzero(split == k).flatten() for k in range(3))
    gen = torch.Generator().manual_seed(seed)
    best = (-1.0, None, 0)
    for epoch in range(30):
        model.train()
        order = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), labels[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val_acc = (model(x[val]).argmax(1) == labels[val]).float().mean().item()
        if val_acc > best[0]:
            best = (val_acc, {k: v.clone() for k, v in model.state_dict().items()}, epoch)
        elif epoch - best[2] >= 6:
            break
    model.load_state_dict(best[1])
    with torch.no_grad():
        return (model(x[test]).argmax(1) == labels[test]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="docs/avdigits_degradation_results.json")
    args = parser.parse_args()
    meta, audio = avdigits.synthesise(avdigits.BuildSpec(), progress=None)
    labels, split = meta["labels"], meta["split"]
    images = meta["images"].to(torch.float32).reshape(len(labels), -1) / 255.0
    results = {"protocol": __doc__.split("\n\n")[1], "image_energy_removed": {}, "audio_snr_db": {}}
    for fraction in IMAGE_ENERGY_REMOVED:
        x = remove_energy(images, images[split == 0], fraction).reshape(-1, 1, 28, 28)
        acc = accuracy(x, labels, split)
        results["image_energy_removed"][str(fraction)] = acc
        print(f"image, {100 * fraction:.0f}% of the energy removed: test {100 * acc:.1f}%", flush=True)
    for snr in AUDIO_SNR_DB:
        x = avdigits.spectrograms(audio, snr, 0).unsqueeze(1)
        label = "clean" if snr is None else f"{snr:+.0f} dB"
        acc = accuracy(x, labels, split)
        results["audio_snr_db"][str(snr)] = acc
        print(f"audio, {label}: test {100 * acc:.1f}%", flush=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
