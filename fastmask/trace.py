"""The balance trace: what the balancer measured per modality, step by step, and a plot of it.

The balancer records, at every step it hands values out, each modality's head-slice accuracy,
its mean true-class probability, its mutual-information rate and the value handed to the
optimizer (ratio or coefficient). Steps are summed into buckets on the statistics' device (no
host synchronisation); when there are ``capacity`` buckets, neighbours merge and a bucket spans
twice as many steps, so memory stays bounded however long the run. ``Balancer.history()`` reads
them (one synchronisation); ``plot_balance`` draws them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

METRICS = ("accuracy", "true_class_prob", "mi_rate")


class BalanceTrace:
    """Per-modality statistics in fewer than ``capacity`` (even) buckets of equal step spans
    (device sums), and the bucket being filled."""

    def __init__(self, modalities: tuple[str, ...], capacity: int) -> None:
        self.modalities = modalities
        self.capacity = capacity
        self.span = 1  # steps per closed bucket
        self.kind: str | None = None
        self._starts: list[int] = []  # first step of each closed bucket (host)
        self._sums: list[torch.Tensor] = []  # float64 [1 + M * 4]: good steps, then per-modality sums
        self._open: torch.Tensor | None = None
        self._open_start = self._open_steps = self._steps = 0

    def record(self, kind: str, row: torch.Tensor, good: torch.Tensor) -> None:
        """Add one step: ``row`` float64 [M, 4] (the metrics and the value), counted if ``good``."""
        self.kind = kind
        entry = torch.where(good, torch.cat((torch.ones(1, dtype=row.dtype, device=row.device), row.reshape(-1))), 0.0)
        if self._open is None:
            self._open, self._open_start = entry, self._steps
        else:
            self._open = self._open + entry
        self._steps += 1
        self._open_steps += 1
        if self._open_steps == self.span:
            self._starts.append(self._open_start)
            self._sums.append(self._open)
            self._open, self._open_steps = None, 0
            if len(self._sums) == self.capacity:  # merge neighbours: twice the span, half the buckets
                self._starts = self._starts[::2]
                self._sums = [sum(self._sums[i:i + 2]) for i in range(0, len(self._sums), 2)]
                self.span *= 2

    def history(self) -> dict[str, Any]:
        if not self._steps:
            raise RuntimeError("Balancer.history: no step has taken the balancer's values yet")
        starts = self._starts + ([self._open_start] if self._open is not None else [])
        sums = torch.stack(self._sums + ([self._open] if self._open is not None else [])).cpu()
        good = sums[:, 0]
        means = (sums[:, 1:] / good[:, None]).reshape(len(starts), len(self.modalities), len(METRICS) + 1)
        value_name = {"ratios": "ratio", "coefficients": "coefficient"}[self.kind]
        names = (*METRICS, value_name)
        out: dict[str, Any] = {"step": starts, "good_steps": [int(n) for n in good], "value": value_name}
        for i, m in enumerate(self.modalities):
            out[m] = {name: means[:, i, j].tolist() for j, name in enumerate(names)}
        return out


def plot_balance(history: dict[str, Any], path: str | Path | None = None) -> Any:
    """Plot ``Balancer.history()``: one panel per metric and the value handed out, a line per
    modality, against the step. Saves to ``path`` if given; returns the matplotlib figure."""
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_balance needs matplotlib (pip install 'fastmask[demo]')") from error
    if not isinstance(history, dict) or "step" not in history or "value" not in history:
        raise TypeError("plot_balance takes Balancer.history()'s dict")
    modalities = [k for k in history if k not in ("step", "good_steps", "value")]
    names = (*METRICS, history["value"])
    titles = {"accuracy": "head-slice accuracy", "true_class_prob": "mean true-class probability",
              "mi_rate": "mutual-information rate", "ratio": "ratio handed out", "coefficient": "coefficient handed out"}
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), constrained_layout=True)
    for ax, name in zip(axes, names):
        for m in modalities:
            ax.plot(history["step"], history[m][name], label=m)
        ax.set_title(titles[name])
        ax.set_xlabel("step")
    axes[0].legend()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
