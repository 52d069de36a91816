"""What the balancer and the op's dispatch cost per step, on the host (CPU), at the demo's sizes.

    python -m fastmask.bench.balancer_overhead [--batch 64] [--width 64] [--iters 500] [--json PATH]

Prints (and with ``--json`` writes, with the CPU and torch version) the median milliseconds of: the two encoders' forward alone; that forward plus
``Balancer.observe`` and ``take`` (the balancer's whole work of a step); that forward plus the
manual path it replaces (``fastmask.significance`` on detached features); and one fused step
of a 4-element batch called eagerly (``ops.masked_step_``), through the ``torch.library`` op,
and as the backend function alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import fastmask
from fastmask import ops
from fastmask import significance as sig
from fastmask.backends.registry import implementation
from fastmask.ops.encoding import config_args, tensor_args
from fastmask.reference.spec import StepConfig, TensorBatch


def median_ms(fn: Callable[[], object], iters: int) -> float:
    for _ in range(iters // 10 + 1):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def balancer_cases(batch: int, width: int, n_classes: int = 7) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    encoders = {"a": nn.Sequential(nn.Linear(8, width), nn.ReLU()), "b": nn.Sequential(nn.Linear(10, width), nn.ReLU())}
    head = nn.Linear(2 * width, n_classes)
    xa, xb, y = torch.randn(batch, 8), torch.randn(batch, 10), torch.randint(0, n_classes, (batch,))
    hooked = copy.deepcopy(encoders)  # the balancer's copy: a captured forward must be observed
    balancer = fastmask.Balancer(hooked, head)

    def forward(modules=encoders):
        return {"a": modules["a"](xa), "b": modules["b"](xb)}

    def with_balancer():
        forward(hooked)
        balancer.observe(y)
        return balancer.take("ratios")

    def manual():
        feats = {m: f.detach() for m, f in forward().items()}
        return sig.amss_ratios(sig.mutual_information_rate(sig.unimodal_logits(head, feats), y, feats))

    return {"forward": forward, "forward + balancer": with_balancer, "forward + manual significance": manual}


def dispatch_cases(backend: str) -> dict[str, Callable[[], object]]:
    p, g = torch.randn(4), torch.randn(4)
    batch = TensorBatch([p], [g], [torch.zeros(())], [0], [torch.zeros(4)], [torch.zeros(4)])
    cfg = StepConfig(ratio=0.5, seed=1)
    backend_fn = implementation("masked_step_", backend, p.device)
    return {
        "ops.masked_step_ (eager)": lambda: ops.masked_step_(batch, cfg, backend=backend),
        "through torch.ops.fastmask.masked_step_": lambda: torch.ops.fastmask.masked_step_(
            *tensor_args(batch), None, None, *config_args(cfg, backend)),
        "the backend function alone": lambda: backend_fn(batch, cfg, None, None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--json", help="also write the medians, the arguments and the machine to this file")
    args = parser.parse_args()
    cases = {**balancer_cases(args.batch, args.width), **dispatch_cases(args.backend)}
    medians = {}
    for name, fn in cases.items():
        medians[name] = median_ms(fn, args.iters)
        print(f"{medians[name]:8.3f} ms  {name}")
    if args.json:
        record = {"median_ms": medians, "args": vars(args), "torch": torch.__version__, "cpu": cpu_model(),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                  "date": time.strftime("%Y-%m-%d")}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
