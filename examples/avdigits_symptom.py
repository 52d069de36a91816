"""Does AV digits show the symptom the balancing methods fix? A search, on validation only.

The papers' symptom: joint training leaves the weak modality's encoder under-trained, so its
frozen features probe clearly below the same encoder trained on its own modality. For each
candidate build (image energy removed, audio SNR) and seed, this trains the demo's model three
ways, each with plain SGD (lr 0.05, momentum 0.9, weight decay 1e-4, batch 64, at most
``--epochs`` epochs, early stopping on validation accuracy after ``--patience`` epochs): the
joint model, the image encoder alone and the audio encoder alone (``fastmask.demo.train``'s
"joint" on ``MultiModalData.only``). Every encoder's frozen features are probed with one
protocol (``fastmask.demo.linear_probe``: a logistic regression fitted on the training split),
scored on the validation split; the test split is not touched. The weak modality is the one
whose encoder probes lower on its own; the symptom is its gap, alone minus joint, averaged over
the seeds. A configuration shows the symptom when that gap is at least 5 points.

    python examples/avdigits_symptom.py [--seeds 3] [--json docs/avdigits_symptom_results.json]

The clean clips are synthesised once (about 40 s); the candidates differ in the noise added to
them and the image energy projected out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

from fastmask import demo
from fastmask.demo import avdigits
from fastmask.demo.data import avdigits_data

IMAGE_ENERGY_REMOVED = (0.0, 0.75)
AUDIO_SNR_DB = (-8.0, -10.0, -12.0)
SYMPTOM_POINTS = 5.0


def probes(dataset, seed: int, epochs: int, patience: int) -> dict[str, dict[str, float]]:
    """Validation probe of each encoder: trained jointly, and alone on its own modality."""
    hp = {"lr": 0.05}
    joint = demo.train(dataset, "joint", seed, epochs, hp, patience=patience, probe_split="val")
    out = {m: {"joint": joint["probe_acc"][m]} for m in dataset.modalities}
    for m in dataset.modalities:
        alone = demo.train(dataset.only(m), "joint", seed, epochs, hp, patience=patience, probe_split="val")
        out[m]["alone"] = alone["probe_acc"][m]
    out["fused_val"] = {"joint": joint["val_acc"]}
    return out


def summarise(runs: list[dict], modalities: list[str]) -> dict:
    """Means and spreads over seeds; the weak modality and its gap in points."""
    out = {}
    for m in modalities:
        for how in ("alone", "joint"):
            values = [100 * r[m][how] for r in runs]
            out[f"{m}_{how}"] = (statistics.mean(values), statistics.pstdev(values))
    weak = min(modalities, key=lambda m: out[f"{m}_alone"][0])
    gaps = [100 * (r[weak]["alone"] - r[weak]["joint"]) for r in runs]
    out.update(weak=weak, gap=(statistics.mean(gaps), statistics.pstdev(gaps)),
               symptom=statistics.mean(gaps) >= SYMPTOM_POINTS)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--json", default="docs/avdigits_symptom_results.json")
    args = parser.parse_args()
    start = time.time()
    meta, audio = avdigits.synthesise(avdigits.BuildSpec(), progress=None)
    results = {"protocol": __doc__.split("\n\n")[1], "seeds": args.seeds, "epochs": args.epochs,
               "patience": args.patience, "configs": []}
    print("| image energy removed | audio SNR | image alone | image joint | audio alone | audio joint | weak | gap "
          "(points) | symptom |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    for fraction, snr in itertools.product(IMAGE_ENERGY_REMOVED, AUDIO_SNR_DB):
        raw = {**meta, "mel": avdigits.spectrograms(audio, snr, 0)}
        dataset = avdigits_data(raw, fraction)
        runs = [probes(dataset, seed, args.epochs, args.patience) for seed in range(args.seeds)]
        summary = summarise(runs, dataset.modalities)
        results["configs"].append({"image_energy_removed": fraction, "snr_db": snr, "runs": runs, **summary})
        cells = " | ".join(f"{summary[k][0]:.1f} ± {summary[k][1]:.1f}"
                           for k in ("image_alone", "image_joint", "audio_alone", "audio_joint"))
        print(f"| {100 * fraction:.0f}% | {snr:+.0f} dB | {cells} | {summary['weak']} | {summary['gap'][0]:+.1f} ± "
              f"{summary['gap'][1]:.1f} | {'yes' if summary['symptom'] else 'no'} |", flush=True)
        results["seconds"] = round(time.time() - start)
        with open(args.json, "w") as f:  # after every configuration: a long search keeps what it found
            json.dump(results, f, indent=1)
    print(f"{time.time() - start:.0f} s; wrote {args.json}")


if __name__ == "__main__":
    main()
