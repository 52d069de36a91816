"""fastmask: fused optimizers and ops for balanced multi-modal training.

``fastmask.AMSS`` / ``fastmask.AMSSPlus`` update an importance-sampled subnetwork
of each modality per step; ``fastmask.OGM`` scales the dominant modality's
gradients (OGM-GE adds noise); ``fastmask.nn.PredictionModulation`` (OPM) drops its
features; ``fastmask.losses.mimo_loss`` optimises a smoothed worst-modality loss.
``fastmask.significance`` measures which modality dominates; ``fastmask.ops`` holds
the low-level ops; ``fastmask.reference`` the exact semantics every backend is
tested against.
"""

from . import losses, nn, ops, reference, significance
from .optim import AMSS, OGM, AMSSPlus, FusedOptimizer

__version__ = "0.1.0"

__all__ = [
    "AMSS",
    "AMSSPlus",
    "FusedOptimizer",
    "OGM",
    "losses",
    "nn",
    "ops",
    "reference",
    "significance",
    "__version__",
]
