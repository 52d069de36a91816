"""The demo: balanced multi-modal training on real data, every method through the public API.

One MLP encoder per modality and a concat-fusion linear head, trained with SGD
(momentum 0.9, the audio-visual papers' optimizer). Methods:

- ``joint``: plain ``torch.optim.SGD`` (the imbalanced baseline);
- ``uniform``: ``fastmask.AMSS(sampling="uniform")`` with the AMSS ratios (the paper's
  uniform-subnetwork baseline);
- ``amss`` / ``amss+``: ``fastmask.AMSS`` / ``fastmask.AMSSPlus`` with ratios from the
  mutual-information rates of each batch, through ``fastmask.Balancer``;
- ``amss+-official``: AMSS+ as its authors' code runs it: each filter (row) a unit, exactly
  ceil(ratio x rows) of them drawn by importance without replacement, the official rescale
  g / (p + 1/N) (``rescale="legacy"``: bounded, not unbiased), the gradient masked while momentum
  and weight decay still act (``masked="zero_grad"``), temperature 0.2; not in the default set;
- ``ogm-ge``: ``fastmask.OGM(ge=True)`` with coefficients from the discrepancy ratio, through
  ``fastmask.Balancer``;
- ``opm``: ``fastmask.nn.PredictionModulation`` on the features (the discrepancy ratio of
  ``fastmask.significance``), plain SGD;
- ``mimo``: ``fastmask.losses.mimo_loss`` with auxiliary uni-modal heads, plain SGD.

Early stopping on validation accuracy; the test split is used only for the report.
Hyper-parameters: ``DEFAULT_HPARAMS``, chosen by ``fastmask demo --tune`` (the grid
``GRID``, mean validation accuracy of seeds 0 and 1).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastmask
from fastmask import data as datasets
from fastmask import significance as sig
from fastmask.losses import mimo_loss, unimodal_losses
from fastmask.nn import AuxiliaryHeads, PredictionModulation
from fastmask.ops.checks import check_int

DEFAULT_METHODS = ("joint", "uniform", "amss", "amss+", "ogm-ge", "opm", "mimo")  # `make demo` runs these
METHODS = DEFAULT_METHODS + ("amss+-official",)
# AMSS+ as the official code runs it (ALGORITHMS.md §2.5-2.9)
OFFICIAL_AMSS_PLUS = dict(granularity="row", sampling="exact", rescale="legacy", masked="zero_grad")
COMMON = dict(hidden=64, batch=64, patience=10)

# The grid searched by --tune, per method (lr is searched for every method).
GRID: dict[str, dict[str, list]] = {
    "joint": {"lr": [0.01, 0.05]},
    "uniform": {"lr": [0.01, 0.05], "temperature": [0.2, 1.0]},
    "amss": {"lr": [0.01, 0.05], "temperature": [0.2, 1.0]},
    "amss+": {"lr": [0.01, 0.05], "temperature": [0.2, 1.0]},
    "amss+-official": {"lr": [0.01, 0.05], "temperature": [0.2]},  # the authors' temperature
    "ogm-ge": {"lr": [0.01, 0.05], "alpha": [0.1, 0.8]},
    "opm": {"lr": [0.01, 0.05], "q_base": [0.3, 0.5]},
    "mimo": {"lr": [0.01, 0.05], "gamma": [0.5, 2.0]},
}
# At most this many epochs per run, stopping early after `patience` epochs without a better
# validation accuracy (AV digits' CNNs are the costly ones: 35 runs must fit in 15 minutes).
# The imbalanced AV digits keeps the protocol its symptom was found with (examples/avdigits_symptom.py).
EPOCHS = {"segment": 60, "mfeat": 60, "avdigits": 20, "avdigits-imbalanced": 60}
PATIENCE = {"segment": COMMON["patience"], "mfeat": COMMON["patience"], "avdigits": 5,
            "avdigits-imbalanced": COMMON["patience"]}
# Built to show the symptom: `fastmask demo` trains the encoders alone there by default (run(alone=True)).
SYMPTOM_DATASETS = ("avdigits-imbalanced",)
# Chosen by `fastmask demo --tune --dataset segment` (mean validation accuracy of seeds 0
# and 1 over GRID; the scores are in docs/demo.md).
DEFAULT_HPARAMS: dict[str, dict] = {
    "joint": {"lr": 0.05},
    "uniform": {"lr": 0.05, "temperature": 0.2},
    "amss": {"lr": 0.05, "temperature": 0.2},
    "amss+": {"lr": 0.05, "temperature": 1.0},
    "amss+-official": {"lr": 0.05, "temperature": 0.2},  # not tuned: amss+'s lr, the authors' temperature
    "ogm-ge": {"lr": 0.05, "alpha": 0.8},
    "opm": {"lr": 0.05, "q_base": 0.3},
    "mimo": {"lr": 0.05, "gamma": 2.0},
}


# Per dataset; a dataset without its own (mfeat) uses DEFAULT_HPARAMS. AV digits': chosen by
# `fastmask demo --tune --dataset avdigits` over GRID (the scores are in docs/demo.md).
HPARAMS: dict[str, dict[str, dict]] = {
    "segment": DEFAULT_HPARAMS,
    "avdigits": {
        "joint": {"lr": 0.01},
        "uniform": {"lr": 0.05, "temperature": 0.2},
        "amss": {"lr": 0.05, "temperature": 1.0},
        "amss+": {"lr": 0.01, "temperature": 0.2},
        "amss+-official": {"lr": 0.01, "temperature": 0.2},  # not tuned: amss+'s
        "ogm-ge": {"lr": 0.01, "alpha": 0.1},
        "opm": {"lr": 0.01, "q_base": 0.3},
        "mimo": {"lr": 0.05, "gamma": 0.5},
    },
    # chosen by `fastmask demo --tune --dataset avdigits-imbalanced` over GRID, every method
    # (amss+-official too), 60 epochs at most, patience 10 (docs/demo_avdigits_imbalanced_tune.log)
    "avdigits-imbalanced": {
        "joint": {"lr": 0.05},
        "uniform": {"lr": 0.05, "temperature": 1.0},
        "amss": {"lr": 0.05, "temperature": 0.2},
        "amss+": {"lr": 0.05, "temperature": 1.0},
        "amss+-official": {"lr": 0.01, "temperature": 0.2},
        "ogm-ge": {"lr": 0.05, "alpha": 0.1},
        "opm": {"lr": 0.05, "q_base": 0.3},
        "mimo": {"lr": 0.05, "gamma": 0.5},
    },
}


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


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


@torch.no_grad()
def evaluate(model: FusionNet, split) -> tuple[float, dict[str, float]]:
    """Fused accuracy and each modality's accuracy from the head's slices (bias / M)."""
    model.eval()
    x, y = split
    feats = model.features(x)
    uni = sig.unimodal_logits(model.head, feats, model.order)
    return _accuracy(model.fuse(feats), y), {m: _accuracy(out, y) for m, out in uni.items()}


def _check_split(name: str, split: str) -> None:
    if split not in ("test", "val"):
        raise ValueError(f"{name} must be 'test' or 'val', got {split!r}")


def linear_probe(model: FusionNet, dataset: datasets.MultiModalData, seed: int, split: str = "test"
                 ) -> dict[str, float]:
    """Accuracy on ``split`` ("test" or "val") of a logistic regression trained on each frozen
    encoder's train features."""
    _check_split("split", split)
    scored = dataset.test if split == "test" else dataset.val
    out = {}
    with torch.no_grad():
        train_feats = model.features(dataset.train[0])
        test_feats = model.features(scored[0])
    for m in model.order:
        gen = torch.Generator().manual_seed(seed)
        probe = nn.Linear(train_feats[m].shape[1], dataset.n_classes)
        with torch.no_grad():
            probe.weight.copy_(torch.randn(probe.weight.shape, generator=gen) * 0.01)
            probe.bias.zero_()
        opt = torch.optim.Adam(probe.parameters(), lr=0.05)
        for _ in range(200):
            opt.zero_grad()
            F.cross_entropy(probe(train_feats[m]), dataset.train[1]).backward()
            opt.step()
        with torch.no_grad():
            out[m] = _accuracy(probe(test_feats[m]), scored[1])
    return out


def _batches(n: int, batch: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    for i in range(0, n, batch):
        yield order[i : i + batch]


def train(dataset: datasets.MultiModalData, method: str, seed: int, epochs: int, hp: dict,
          patience: int | None = None, probe_split: str = "test") -> dict:
    """Train one model (early stopping on validation after ``patience`` epochs without a better
    accuracy, default the dataset's); returns its metrics (the probes scored on
    ``probe_split``), traces and timing."""
    patience = PATIENCE[dataset.name] if patience is None else check_int("patience", patience, 1, 10**6)
    _check_split("probe_split", probe_split)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    torch.manual_seed(seed)
    model = FusionNet(dataset.shapes(), dataset.n_classes, COMMON["hidden"])
    sgd = dict(lr=hp["lr"], momentum=0.9, weight_decay=1e-4)
    aux = AuxiliaryHeads({m: COMMON["hidden"] for m in model.order}, dataset.n_classes) if method == "mimo" else None
    opm = PredictionModulation(q_base=hp.get("q_base", 0.5), lam=0.5, p_exe=0.7, seed=seed) if method == "opm" else None
    balancer = None
    if method in ("uniform", "amss", "amss+", "amss+-official", "ogm-ge"):
        # the balancer measures each batch's significance from the forward pass (hooks on the encoders)
        rule = {"temperature": hp["temperature"]} if "temperature" in hp else {"alpha": hp["alpha"]}
        balancer = fastmask.Balancer({m: model.encoders[m] for m in model.order}, model.head, **rule)
    if method in ("uniform", "amss", "amss+", "amss+-official"):
        cls = fastmask.AMSSPlus if method.startswith("amss+") else fastmask.AMSS
        kwargs = {"uniform": {"sampling": "uniform"}, "amss+-official": OFFICIAL_AMSS_PLUS}.get(method, {})
        opt = cls(model.groups(), base="sgd", seed=seed, balancer=balancer, **sgd, **kwargs)
    elif method == "ogm-ge":
        opt = fastmask.OGM(model.groups(), base="sgd", ge=True, seed=seed, balancer=balancer, **sgd)
    else:
        params = list(model.parameters()) + (list(aux.parameters()) if aux is not None else [])
        opt = torch.optim.SGD(params, **sgd)

    x_train, y_train = dataset.train
    gen = torch.Generator().manual_seed(seed)
    best = (-1.0, None, 0)
    trace: list[dict[str, float]] = []
    epoch_times, step_times = [], []
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        step_time = 0.0
        knob_sum: dict[str, float] = {}
        steps = 0
        for idx in _batches(len(y_train), COMMON["batch"], gen):
            x = {m: v[idx] for m, v in x_train.items()}
            y = y_train[idx]
            opt.zero_grad()
            feats = model.features(x)
            knobs = {}
            if opm is not None:
                knobs = _discrepancy(model, feats, y)
                feats = opm(feats, knobs)
            logits = model.fuse(feats)
            loss = F.cross_entropy(logits, y)
            if aux is not None:
                loss = mimo_loss(loss, unimodal_losses(aux(feats), y), gamma=hp["gamma"], mu=0.5)
            loss.backward()
            if balancer is not None:
                balancer.observe(y)
            step_start = time.perf_counter()
            opt.step()  # with a balancer: this batch's ratios / coefficients
            step_time += time.perf_counter() - step_start
            if balancer is not None:
                setting = opt.ratio if isinstance(opt, fastmask.AMSS) else opt.coefficient
                knobs = {m: float(setting(m)) for m in model.order}
            for m, value in knobs.items():
                knob_sum[m] = knob_sum.get(m, 0.0) + value
            steps += 1
        epoch_times.append(time.perf_counter() - start)
        step_times.append(step_time)
        trace.append({m: v / steps for m, v in knob_sum.items()})
        val_acc, _ = evaluate(model, dataset.val)
        if val_acc > best[0]:
            best = (val_acc, copy.deepcopy(model.state_dict()), epoch)
        elif epoch - best[2] >= patience:
            break
    model.load_state_dict(best[1])
    test_acc, uni = evaluate(model, dataset.test)
    return {
        "method": method, "seed": seed, "hparams": hp, "best_epoch": best[2], "val_acc": best[0],
        "test_acc": test_acc, "unimodal_acc": uni, "probe_acc": linear_probe(model, dataset, seed, probe_split),
        "seconds_per_epoch": statistics.mean(epoch_times), "step_share": sum(step_times) / sum(epoch_times),
        "trace": trace,
        "update_fraction": _update_fraction(opt, trace, model.order) if isinstance(opt, fastmask.AMSS) else None,
    }


def _update_fraction(opt: fastmask.AMSS, trace: list[dict[str, float]], order: list[str]) -> dict[str, dict]:
    """Per modality, over the whole run: the mean of the per-epoch mean ratios, and the expected
    (sum pi / N) and realised (selected / N) fractions of the optimizer's stats."""
    stats = opt.stats()
    return {m: {"ratio": statistics.mean(epoch[m] for epoch in trace), "expected": stats[m]["expected_fraction"],
                "realised": stats[m]["realised_fraction"]} for m in order}


def _discrepancy(model: FusionNet, feats, y) -> dict[str, float]:
    """OPM's per-modality discrepancy ratio of this batch (the balancer serves the optimizers)."""
    detached = {m: f.detach() for m, f in feats.items()}
    return sig.discrepancy(sig.unimodal_logits(model.head, detached, model.order), y)


def tune(dataset_name: str, views, epochs: int, methods, log: Callable[..., None] = print) -> dict[str, dict]:
    """The grid of ``GRID`` on validation accuracy (mean of seeds 0 and 1); returns the best per method."""
    chosen = {}
    for method in methods:
        keys = list(GRID[method])
        scores = []
        for values in itertools.product(*(GRID[method][k] for k in keys)):
            hp = dict(zip(keys, values))
            vals = [train(datasets.load(dataset_name, views, seed), method, seed, epochs, hp)["val_acc"]
                    for seed in (0, 1)]
            scores.append((statistics.mean(vals), hp))
            log(f"tune {method:8s} {hp}: val {statistics.mean(vals):.4f}", flush=True)
        chosen[method] = max(scores, key=lambda s: s[0])[1]
        log(f"tune {method:8s} chose {chosen[method]}", flush=True)
    return chosen


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
        result["alone_probe"] = {m: _mean_std([r["probe_acc"][m] for r in alone_runs if r["method"] == m + " alone"])
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


def step_speed(dataset: datasets.MultiModalData, iters: int = 50) -> dict[str, float]:
    """Median ms of one optimizer step on the demo's model of ``dataset`` (every param with a
    gradient, forward and backward excluded), in one process: torch's AdamW (fused, and its
    foreach form) against fastmask's AMSS+ with AdamW as the base, at ratio 0.5 for every
    modality (the fused step of the best backend here: cpp on CPU)."""
    torch.manual_seed(0)
    model = FusionNet(dataset.shapes(), dataset.n_classes, COMMON["hidden"])
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    ratios = {m: 0.5 for m in model.order}
    optimizers = {
        "torch AdamW (fused)": (torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), {}),
        "torch AdamW (foreach)": (torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True), {}),
        "fastmask AMSS+ (AdamW base)": (fastmask.AMSSPlus(model.groups(), lr=1e-3, base="adamw"), {"ratios": ratios}),
    }
    out = {}
    for name, (opt, kwargs) in optimizers.items():
        times = []
        for i in range(iters + 5):
            start = time.perf_counter()
            opt.step(**kwargs)
            if i >= 5:  # warm-up: state allocation, the extension's first call
                times.append((time.perf_counter() - start) * 1e3)
        out[name] = statistics.median(times)
    return out


def _mean_std(values) -> tuple[float, float]:
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict], methods) -> dict:
    summary = {}
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        modalities = list(rs[0]["probe_acc"])
        summary[method] = {
            "test_acc": _mean_std([r["test_acc"] for r in rs]),
            "probe_acc": {m: _mean_std([r["probe_acc"][m] for r in rs]) for m in modalities},
            "unimodal_acc": {m: _mean_std([r["unimodal_acc"][m] for r in rs]) for m in modalities},
            "seconds_per_epoch": statistics.mean(r["seconds_per_epoch"] for r in rs),
            "step_share": statistics.mean(r["step_share"] for r in rs),
        }
        if rs[0].get("update_fraction"):
            summary[method]["update_fraction"] = {
                m: {k: _mean_std([r["update_fraction"][m][k] for r in rs]) for k in ("ratio", "expected", "realised")}
                for m in modalities
            }
    return summary


def format_fractions(result: dict) -> str:
    """The masked methods' mean ratio and realised update fraction per modality (mean over seeds)."""
    rows = ["| method | " + " | ".join(f"{m}: ratio -> realised" for m in _modalities(result)) + " |",
            "|" + "---|" * (1 + len(_modalities(result)))]
    for method, s in result["summary"].items():
        if "update_fraction" in s:
            cells = [f"{s['update_fraction'][m]['ratio'][0]:.3f} -> {s['update_fraction'][m]['realised'][0]:.3f}"
                     for m in _modalities(result)]
            rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_table(result: dict) -> str:
    """The methods' table (mean ± std over seeds, in %); with the encoders alone (``run(alone=True)``),
    a first row of their probes and a column of the share of the weak modality's gap each method
    closes."""
    modalities = _modalities(result)
    weak = result.get("weak")
    gap_header = f" {weak} gap closed |" if weak and "gap_closed" in result["summary"].get("joint", {}) else ""
    rows = ["| method | test fused acc | " + " | ".join(f"probe {m}" for m in modalities) + " | "
            + " | ".join(f"head slice {m}" for m in modalities) + " |" + gap_header + " s / epoch | in opt.step() |"]
    rows.append("|" + "---|" * (4 + 2 * len(modalities) + bool(gap_header)))
    if "alone_probe" in result:
        cells = ["-"] + [_percent(result["alone_probe"][m]) for m in modalities] + ["-"] * (len(modalities) + 2)
        rows.append("| each encoder alone | " + " | ".join(cells + ["-"] * bool(gap_header)) + " |")
    for method, s in result["summary"].items():
        cells = [_percent(s["test_acc"])] + [_percent(s["probe_acc"][m]) for m in modalities]
        cells += [_percent(s["unimodal_acc"][m]) for m in modalities]
        cells += [f"{100 * s['gap_closed'][weak]:.0f}%"] if gap_header else []
        cells += [f"{s['seconds_per_epoch']:.3f}", f"{100 * s['step_share']:.0f}%"]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _percent(mean_std: tuple[float, float]) -> str:
    return f"{100 * mean_std[0]:.1f} ± {100 * mean_std[1]:.1f}"


def _modalities(result: dict) -> list[str]:
    return list(next(iter(result["summary"].values()))["probe_acc"])


def plot(result: dict, path: Path) -> None:
    """Fused accuracy per method (error bars), probe accuracy per modality, ratio/coefficient traces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    methods = list(summary)
    modalities = _modalities(result)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    means = [100 * summary[m]["test_acc"][0] for m in methods]
    stds = [100 * summary[m]["test_acc"][1] for m in methods]
    axes[0].bar(methods, means, yerr=stds, capsize=4, color="tab:blue")
    axes[0].set_ylim(min(means) - 5, min(100, max(means) + 3))
    axes[0].set_title(f"test fused accuracy (%), {result['seeds']} seeds")
    axes[0].tick_params(axis="x", rotation=30)
    width = 0.8 / len(modalities)
    for j, mod in enumerate(modalities):
        xs = [i + j * width for i in range(len(methods))]
        axes[1].bar(xs, [100 * summary[m]["probe_acc"][mod][0] for m in methods], width,
                    yerr=[100 * summary[m]["probe_acc"][mod][1] for m in methods], capsize=3, label=mod)
    axes[1].set_xticks([i + width * (len(modalities) - 1) / 2 for i in range(len(methods))], methods, rotation=30)
    for j, mod in enumerate(modalities):
        if "alone_probe" in result:  # the reference: the same encoder trained on its own modality
            axes[1].axhline(100 * result["alone_probe"][mod][0], color=f"C{j}", linestyle="--", linewidth=1,
                            label=f"{mod} alone")
    axes[1].set_title("linear probe of each frozen encoder (%)")
    axes[1].legend()
    for method, style in (("amss+", "-"), ("ogm-ge", "--"), ("uniform", ":")):
        run = next((r for r in result["runs"] if r["method"] == method and r["seed"] == 0), None)
        if run is None:
            continue
        for mod in modalities:
            axes[2].plot([t.get(mod, math.nan) for t in run["trace"]], style, label=f"{method} {mod}")
    axes[2].set_title("per-epoch mean ratio (AMSS) / coefficient (OGM), seed 0")
    axes[2].set_xlabel("epoch")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
