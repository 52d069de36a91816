"""The pure-PyTorch reference: exact semantics of every op, the oracle of every backend."""

import warnings

from .philox import normal, philox4x32, rng_stream, uniform, uniform_at
from .spec import StepConfig, TensorBatch, exact_count
from .step import base_update, masked_step_


def __getattr__(name: str) -> object:
    if name == "TensorGroup":  # the batch's former name: old code keeps working, with a warning
        warnings.warn("fastmask.reference.TensorGroup was renamed TensorBatch", DeprecationWarning, stacklevel=2)
        return TensorBatch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
