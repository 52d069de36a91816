"""Test configurations declared once (optimi's tests/config.py shape).

``BACKEND_CONFIGS``: the optimizer configurations every fast backend is held to against the
reference, with the per-modality values they step with. ``TOLERANCE``: every comparison that
is not bit for bit, with why it cannot be.
"""

from dataclasses import dataclass, field

import torch

import fastmask


@dataclass(frozen=True)
class OptimizerConfig:
    cls: type
    kwargs: dict = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """Bit-identical across backends, unless GE noise (log / cos of the math library) is on."""
        return not self.kwargs.get("ge", False)

    def settings(self) -> dict:
        """The step keyword with this method's per-modality values (a masked / modulated run)."""
        if self.cls is fastmask.OGM:
            return {"coefficients": {"audio": 0.4}}
        return {"ratios": {"audio": 0.3, "visual": 0.7}}

    def build(self, groups, **extra) -> fastmask.FusedOptimizer:
        """The optimizer over ``groups``; ``extra`` (e.g. seed, backend) adds to the kwargs."""
        return self.cls(groups, **{**self.kwargs, **extra})


BACKEND_CONFIGS = {
    "amss+-adamw-grad2": OptimizerConfig(fastmask.AMSSPlus, dict(lr=1e-2)),
    "amss+-adamw-ema": OptimizerConfig(fastmask.AMSSPlus, dict(lr=1e-2, importance="ema", fisher_beta=0.8)),
    "amss-sgd-grad2": OptimizerConfig(fastmask.AMSS, dict(base="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "amss+-sgd-nesterov": OptimizerConfig(fastmask.AMSSPlus, dict(base="sgd", lr=0.05, momentum=0.9, nesterov=True)),
    "amss+-sgd-dampening": OptimizerConfig(fastmask.AMSSPlus, dict(base="sgd", lr=0.05, momentum=0.5, dampening=0.3)),
    "amss+-adam-row": OptimizerConfig(fastmask.AMSSPlus, dict(base="adam", lr=1e-2, granularity="row",
                                                              weight_decay=0.01)),
    "amss+-uniform-legacy": OptimizerConfig(fastmask.AMSSPlus, dict(lr=1e-2, sampling="uniform", rescale="legacy")),
    "amss+-row-legacy-ema": OptimizerConfig(fastmask.AMSSPlus, dict(lr=1e-2, granularity="row", rescale="legacy",
                                                                    importance="ema")),
    "amss-exact": OptimizerConfig(fastmask.AMSS, dict(lr=1e-2, sampling="exact")),
    "amss+-exact-row-legacy": OptimizerConfig(fastmask.AMSSPlus, dict(lr=1e-2, sampling="exact", rescale="legacy",
                                                                      granularity="row")),
    "amss+-zero-grad-maximize": OptimizerConfig(fastmask.AMSSPlus, dict(base="adam", lr=1e-2, masked="zero_grad",
                                                                        maximize=True)),
    "amss+-min-prob": OptimizerConfig(fastmask.AMSSPlus, dict(lr=1e-2, min_prob=0.2)),
    "amss+-tensor-lr": OptimizerConfig(fastmask.AMSSPlus, dict(lr=torch.tensor(1e-2))),
    "ogm-sgd": OptimizerConfig(fastmask.OGM, dict(base="sgd", lr=0.05, momentum=0.9)),
    "ogm-ge-adamw-update": OptimizerConfig(fastmask.OGM, dict(lr=1e-2, ge=True, modulate="update")),
    "ogm-ge-sgd": OptimizerConfig(fastmask.OGM, dict(base="sgd", lr=0.05, ge=True)),
}

# The configurations the distributed tests (DDP, FSDP2) run: the element, row and OGM-GE paths.
DISTRIBUTED_CONFIGS = ("amss+-adamw-ema", "amss-sgd-grad2", "amss+-row-legacy-ema", "ogm-ge-sgd")

# Relative to each tensor's scale (tests.optim.models.assert_close_to_scale), or rtol = atol.
TOLERANCE = {
    # a fast backend vs the reference where values pass through log / cos (GE noise), whose last
    # bit depends on the math library: params, and states (Adam's v amplifies a last-bit change)
    "backend_ge_params": 1e-6,
    "backend_ge_states": 1e-5,
    # fastmask vs torch.optim at ratio 1: torch's CPU kernels fuse multiply-adds (torch.lerp)
    "vs_torch": 1e-6,
    # a fast backend vs the reference with bf16 / fp16 params: one rounding of the param apart
    torch.bfloat16: 1e-2,
    torch.float16: 1e-3,
}
