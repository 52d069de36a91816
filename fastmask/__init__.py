"""fastmask: fused optimizers and ops for balanced multi-modal training.

``fastmask.AMSS`` / ``fastmask.AMSSPlus`` update an importance-sampled subnetwork
of each modality per step; ``fastmask.OGM`` scales the dominant modality's
gradients (OGM-GE adds noise); ``fastmask.nn.PredictionModulation`` (OPM) drops its
features; ``fastmask.losses.mimo_loss`` optimises a smoothed worst-modality loss.
``fastmask.Balancer`` measures which modality dominates from the model's forward pass and
hands the optimizers their per-step values (``Balancer.history()`` and
``fastmask.plot_balance``: what it measured, step by step; ``fastmask.significance``: the same
from one batch, by hand); ``fastmask.modality_groups`` builds param groups by module name; ``fastmask.ops`` holds
the low-level ops; ``fastmask.reference`` the exact semantics every backend is
tested against.
"""

from . import losses, nn, ops, reference, significance
from .balancer import Balancer, modality_groups
from .optim import AMSS, OGM, AMSSPlus, FusedOptimizer
from .trace import plot_balance

__version__ = "0.1.0"

__all__ = [
    "AMSS",
    "AMSSPlus",
    "Balancer",
    "FusedOptimizer",
    "OGM",
    "losses",
    "modality_groups",
    "nn",
    "ops",
    "plot_balance",
    "reference",
    "significance",
    "__version__",
]
