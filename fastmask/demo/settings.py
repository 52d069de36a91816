"""The demo's methods, search grid, epochs and the hyper-parameters chosen per dataset."""

from __future__ import annotations

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
