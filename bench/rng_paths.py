"""The cpp step with each Philox loop this CPU can run, timed side by side with torch's fused AdamW.

    python -m fastmask.bench.rng_paths [--json bench/results/cpu-rng-paths-<date>.json]

The cpp extension is built once per loop (``fastmask.backends.cpp.rng_variant``: see ``BUILDS``,
each only where the CPU has its instructions) and the element-unit AMSS+-AdamW
step (grad2 importance, ratio 0.5, water-filling) runs on one tensor of 2^22 elements and on the
two ResNet-18 encoders of ``fastmask bench``'s av-resnet18 set, whole and by phase (pass 1 and
the level solve timed alone; pass 2, with the Philox draws, is the step less those two). Rounds
alternate the builds and fused AdamW, so that a shared machine's load falls on all of them alike;
medians over rounds.
The record names the CPU (``lscpu`` model and SIMD flags): the same code runs at very different
ratios on AVX2 and AVX-512 machines.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

from fastmask.backends import cpp
from fastmask.backends.native import NativeStep
from fastmask.reference.spec import StepConfig, TensorBatch

from .suites import _params, resnet18_shapes, torch_adamw_step

# name: (Philox loop, capped at AVX2, the torch CPU capabilities it runs on). "portable" and "avx2"
# are an AVX2 machine's builds before and after its vector loop (on an AVX-512 CPU, emulated by
# compiling without AVX-512); "portable (native)" and "avx512" are an AVX-512 machine's.
BUILDS = {
    "portable (avx2 isa)": ("portable", True, ("AVX2", "AVX512")),
    "avx2": ("avx2", True, ("AVX2", "AVX512")),
    "portable (native)": ("portable", False, None),
    "avx512": ("avx512", False, ("AVX512",)),
}


def cpu_name() -> str:
    """The CPU's model and SIMD flags (lscpu), or what Python knows."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    flags = [f for f in fields.get("Flags", "").split() if f.startswith(("avx", "sse4", "fma"))]
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs, {' '.join(flags)}"


def _tensors(shapes: list[tuple[int, ...]]) -> tuple[list[torch.Tensor], ...]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    return params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]


def time_paths(shapes: list[tuple[int, ...]], rounds: int) -> dict[str, float]:
    """Median ms of each runnable build's step, of its pass 1 and its level solve alone (keys
    "<build> pass 1", "<build> level"), and of torch's fused AdamW, alternated per round."""
    capability = torch.backends.cpu.get_cpu_capability()
    cfg = StepConfig(ratio=0.5, unbiased=True, seed=0)
    steps: dict[str, callable] = {}
    for name, (path, capped, runs_on) in BUILDS.items():
        if runs_on is not None and capability not in runs_on:
            continue
        module = cpp.rng_variant(path, capped).module()
        if module is None or module.rng_path() != path:
            raise RuntimeError(f"the {name} build failed or compiled another loop")
        params, grads, m, v = _tensors(shapes)
        batch = TensorBatch(params, grads, [torch.tensor(0.0) for _ in params], list(range(len(params))),
                            exp_avgs=m, exp_avg_sqs=v)
        step = NativeStep(lambda module=module: module, settings_in_memory=False)
        steps[name] = lambda step=step, batch=batch: step.masked_step_(batch, cfg, None, None)
        steps[f"{name} pass 1"] = lambda step=step, batch=batch: step.masked_step_sums(batch, cfg, None,
                                                                                      handed_out=False)
        sums, _ = step.masked_step_sums(batch, cfg, None, handed_out=False)
        steps[f"{name} level"] = lambda sums=sums, module=module: cpp.cpp_water_levels(sums, cfg, module)
    steps["torch fused AdamW"] = torch_adamw_step(_params({"m": shapes}, torch.device("cpu")), fused=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(2):  # warm-up: first touches, thread pools
        for step in steps.values():
            step()
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", help="write the record here")
    args = parser.parse_args()
    record = {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "capability": torch.backends.cpu.get_cpu_capability(), "sets": {}}
    for name, shapes in (("large", [(2**22,)]), ("av-resnet18", resnet18_shapes(1) + resnet18_shapes(3))):
        ms = time_paths(shapes, args.rounds)
        adamw = ms["torch fused AdamW"]
        record["sets"][name] = {path: {"median_ms": round(t, 3), "x_fused_adamw": round(t / adamw, 2)}
                                for path, t in ms.items()}
        print(f"{name}: " + ", ".join(f"{path} {t:.2f} ms ({t / adamw:.2f}x)" for path, t in ms.items()
                                      if not path.endswith((" pass 1", " level"))), flush=True)
        for build in BUILDS:
            if build in ms:  # pass 2 (with Philox): the step less its pass 1 and level, each timed alone
                pass2 = ms[build] - ms[f"{build} pass 1"] - ms[f"{build} level"]
                record["sets"][name][build]["pass2_ms_derived"] = round(pass2, 3)
                print(f"  {build}: pass 1 {ms[build + ' pass 1']:.2f} ms, level {ms[build + ' level']:.2f} ms, "
                      f"pass 2 (derived) {pass2:.2f} ms", flush=True)
    print(record["cpu"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
