"""Training one model with one method (every method through the public API), its evaluation,
the linear probes, the hyper-parameter search and the optimizer step's timing."""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import fastmask
from fastmask import significance as sig
from fastmask.losses import mimo_loss, unimodal_losses
from fastmask.nn import AuxiliaryHeads, PredictionModulation
from fastmask.ops.checks import check_int

from . import data as datasets
from .models import FusionNet
from .settings import COMMON, GRID, METHODS, OFFICIAL_AMSS_PLUS, PATIENCE

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
