"""The pure-PyTorch reference: exact semantics of every op, the oracle of every backend."""

from .philox import normal, philox4x32, rng_stream, uniform, uniform_at
from .spec import StepConfig, TensorBatch, exact_count
from .step import base_update, masked_step_

__all__ = [
    "StepConfig",
    "TensorBatch",
    "base_update",
    "exact_count",
    "masked_step_",
    "normal",
    "philox4x32",
    "rng_stream",
    "uniform",
    "uniform_at",
]
