"""Host-side helpers shared by the native backends (triton, cpp, cuda)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..reference import sampling
from ..reference.philox import rng_stream
from ..reference.spec import StepConfig, TensorGroup, exact_count

BATCH_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "momentum_buffers", "fishers")


def working_copies(group: TensorGroup) -> tuple[dict[str, list[torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Contiguous versions of every tensor a kernel touches, and the (original, copy) pairs
    to write back after the step: kernels index elements in logical (row-major) order."""
    work, write_back = {}, []
    for name in BATCH_LISTS:
        values = []
        for x in getattr(group, name):
            if x.is_contiguous():
                values.append(x)
            else:
                copy = x.contiguous()
                values.append(copy)
                if name != "grads":
                    write_back.append((x, copy))
        work[name] = values
    return work, write_back


def unit_layout(params: list[torch.Tensor], granularity: str) -> tuple[list[int], list[int]]:
    """Units per tensor and each tensor's offset in a concatenated per-unit table."""
    units = [sampling.unit_count(p.shape, granularity) for p in params]
    offsets, total = [], 0
    for n in units:
        offsets.append(total)
        total += n
    return units, offsets


Selector = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


def exact_unit_weights(
    work: dict, group: TensorGroup, cfg: StepConfig, grad_scale: torch.Tensor | None, select: Selector
) -> tuple[torch.Tensor, list[int]]:
    """Exact (Gumbel-top-k) selection of every tensor into one per-unit weight table
    (0 = not selected, else the rescale weight); ``select(s_units, count, stream)`` picks
    the units. Returns the table and the unit offsets."""
    units, offsets = unit_layout(work["params"], cfg.granularity)
    device = work["params"][0].device
    table = torch.zeros(max(sum(units), 1), dtype=torch.float32, device=device)
    for t, g in enumerate(work["grads"]):
        if not units[t]:
            continue
        g32 = g.to(torch.float32)
        if grad_scale is not None:
            g32 = g32 / grad_scale
        s = sampling.fisher_update(work["fishers"][t], g32, cfg.fisher_beta) if work["fishers"] else g32 * g32
        s_units = sampling.unit_sums(s, cfg.granularity)
        stream = rng_stream(group.steps[t] + 1, group.slots[t])
        selected = select(s_units, exact_count(cfg.ratio, units[t]), stream)
        weights = sampling.rescale_weights(s_units, None, cfg.unbiased, cfg.rescale)
        table[offsets[t] : offsets[t] + units[t]] = (
            selected.to(torch.float32) if weights is None else torch.where(selected, weights, 0.0)
        )
    return table, offsets
