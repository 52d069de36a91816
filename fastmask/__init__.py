"""fastmask: fused optimizers and ops for balanced multi-modal training.

``fastmask.AMSS`` / ``fastmask.AMSSPlus`` are drop-in ``torch.optim`` optimizers
that update an importance-sampled subnetwork of each modality per step;
``fastmask.ops`` holds the low-level ops; ``fastmask.reference`` the exact
pure-PyTorch semantics every backend is tested against.
"""

from . import ops, reference
from .optim import AMSS, AMSSPlus, FusedOptimizer

__version__ = "0.1.0"

__all__ = ["AMSS", "AMSSPlus", "FusedOptimizer", "ops", "reference", "__version__"]
