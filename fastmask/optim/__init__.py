"""Optimizers: one base with the torch.optim contract, one module per method."""

from .amss import AMSS, AMSSPlus
from .base import FusedOptimizer
from .ogm import OGM

__all__ = ["AMSS", "AMSSPlus", "FusedOptimizer", "OGM"]
