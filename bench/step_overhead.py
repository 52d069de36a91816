"""Per-step Python overhead of a fastmask optimizer: ``step()`` with the fused op replaced by a
no-op, on the ``small`` shape set (2,000 tensors of 4,096 elements in two modalities).

    python -m fastmask.bench.step_overhead [--tensors 2000] [--iters 50]

What is left is the optimizer's own work per step (checks, state, batching, the config): the
part that does not shrink with a faster kernel. Prints the median milliseconds per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastmask
from fastmask import ops


def overhead_ms(n_tensors: int = 2000, numel: int = 4096, iters: int = 50) -> float:
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in range(n_tensors):
        p = torch.nn.Parameter(torch.randn(numel, generator=gen))
        p.grad = torch.randn(numel, generator=gen)
        params.append(p)
    half = n_tensors // 2
    opt = fastmask.AMSSPlus([{"params": params[:half], "modality": "a"}, {"params": params[half:], "modality": "b"}],
                            seed=0, backend="torch")
    ratios = {"a": 0.5, "b": 0.7}
    fused_op = ops.masked_step_
    ops.masked_step_ = lambda *args, **kwargs: None  # the optimizer calls it as ops.masked_step_
    try:
        opt.step(ratios=ratios)  # first step: states are created
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            opt.step(ratios=ratios)
            times.append(time.perf_counter() - start)
    finally:
        ops.masked_step_ = fused_op
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    print(f"{overhead_ms(args.tensors, iters=args.iters):.2f} ms per step of Python overhead "
          f"({args.tensors} tensors, fastmask {fastmask.__version__} from {fastmask.__file__})")


if __name__ == "__main__":
    main()
