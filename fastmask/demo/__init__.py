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

The package: ``data`` (the datasets, ``load(name)``), ``avdigits`` (the AV digits built offline
from real parts), ``settings`` (methods, grid, hyper-parameters), ``models`` (encoders and the
fusion head), ``train`` (one model with one method, evaluation, probes, tuning), ``report``
(summaries, tables, the plot) and ``experiment`` (``run``: every method on every seed).
"""

from . import avdigits, data
from .experiment import gap_closed, run
from .models import FusionNet, encoder
from .report import format_fractions, format_table, mean_std, plot, summarise
from .settings import (COMMON, DEFAULT_HPARAMS, DEFAULT_METHODS, EPOCHS, GRID, HPARAMS, METHODS, OFFICIAL_AMSS_PLUS,
                       PATIENCE, SYMPTOM_DATASETS)
from .train import evaluate, linear_probe, step_speed, train, tune

__all__ = ["COMMON", "DEFAULT_HPARAMS", "DEFAULT_METHODS", "EPOCHS", "GRID", "HPARAMS", "METHODS", "OFFICIAL_AMSS_PLUS",
           "PATIENCE", "SYMPTOM_DATASETS", "FusionNet", "avdigits", "data", "encoder", "evaluate", "format_fractions",
           "format_table", "gap_closed", "linear_probe", "mean_std", "plot", "run", "step_speed", "summarise", "train",
           "tune"]
