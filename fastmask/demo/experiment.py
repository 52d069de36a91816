"""``run``: every method on every seed of one dataset, summarised, written and plotted."""

from __future__ import annotations

import json
import math
from pathlib import Path


from . import data as datasets
from .report import mean_std, plot, summarise
from .settings import DEFAULT_HPARAMS, DEFAULT_METHODS
from .train import step_speed, train

def run(dataset_name: str = "segment", views=None, methods=DEFAULT_METHODS, seeds: int = 5, epochs: int = 60,
        out: str | Path = "demo_out", hparams: dict | None = None, progress: bool = True, alone: bool = False) -> dict:
    """Train every method on every seed; write results.json and results.png to ``out``.

    ``alone``: also train each modality's encoder on its own modality per seed (the "joint"
    method's hyper-parameters), the reference of the symptom: the summary then holds each
    encoder's probe alone (``alone_probe``) and, beside "joint", the share of the weak modality's
    gap that each method closes (``gap_closed``)."""
    if not isinstance(alone, bool):
        raise TypeError(f"alone must be a bool, got {alone!r}")
    hparams = hparams or DEFAULT_HPARAMS
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    modalities = datasets.load(dataset_name, views, 0).modalities
    jobs = [(m, s) for m in methods for s in range(seeds)]
    jobs += [(("alone", m), s) for m in modalities for s in range(seeds)] if alone else []
    bar = _progress(len(jobs), progress)
    runs, alone_runs = [], []
    for method, seed in jobs:
        dataset = datasets.load(dataset_name, views, seed)
        if isinstance(method, tuple):
            alone_runs.append(train(dataset.only(method[1]), "joint", seed, epochs, hparams["joint"]))
            alone_runs[-1]["method"] = method[1] + " alone"
            bar(f"{method[1]} alone seed {seed}: probe {alone_runs[-1]['probe_acc'][method[1]]:.3f}")
        else:
            runs.append(train(dataset, method, seed, epochs, hparams[method]))
            bar(f"{method} seed {seed}: test {runs[-1]['test_acc']:.3f}")
    summary = summarise(runs, methods)
    result = {"dataset": dataset_name, "views": views, "seeds": seeds, "epochs": epochs, "hparams": hparams,
              "summary": summary}
    if alone:
        result["alone_probe"] = {m: mean_std([r["probe_acc"][m] for r in alone_runs if r["method"] == m + " alone"])
                                 for m in modalities}
        result["weak"] = min(modalities, key=lambda m: result["alone_probe"][m][0])
        if "joint" in summary:
            for s in summary.values():
                s["gap_closed"] = gap_closed(s["probe_acc"], summary["joint"]["probe_acc"], result["alone_probe"])
    result.update(step_ms=step_speed(datasets.load(dataset_name, views, 0)), runs=runs + alone_runs)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "results.png")
    return result


def gap_closed(probe: dict, joint: dict, alone: dict) -> dict[str, float]:
    """Per modality, the share of its symptom gap a method closes: (probe - joint probe) /
    (probe alone - joint probe), from the means over seeds (each a (mean, std) pair); 0 is the
    joint model, 1 the encoder trained alone, NaN where joint training left no gap."""
    out = {}
    for m in probe:
        gap = alone[m][0] - joint[m][0]
        out[m] = (probe[m][0] - joint[m][0]) / gap if gap > 0 else math.nan
    return out


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if enabled and tqdm is not None:
        bar = tqdm(total=total, unit="run")

        def update(message: str) -> None:
            bar.set_postfix_str(message)
            bar.update(1)
            if bar.n == total:
                bar.close()

        return update
    return lambda message: print(message) if enabled else None
