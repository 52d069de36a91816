"""The CPU benchmarks as an AVX2-only machine runs them, on a CPU that also has AVX-512.

    python -m fastmask.bench.avx2_machine bench --device cpu --sets large --backends cpp
    python -m fastmask.bench.avx2_machine step-speed [--dataset avdigits]

torch's own CPU kernels (fused AdamW included) run on their AVX2 path (``ATEN_CPU_CAPABILITY=avx2``,
set here before torch loads), and the cpp backend's extension is compiled without AVX-512
(``fastmask.backends.cpp.rng_variant("avx2", cap_at_avx2=True)``: what ``-march=native`` gives on an
AVX2 machine). ``bench ...`` is ``fastmask bench`` with those two changes; ``step-speed`` is the
demo's one-step timing (``results["step_ms"]``) on that dataset's model. An emulation: the same
cores, caches and memory, only the instruction set narrowed; an AVX2 CPU of another make (AMD's
Zen) has its own costs per instruction, so its numbers are its own.
"""

from __future__ import annotations

import os
import sys

CAPABILITY = "avx2"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("ATEN_CPU_CAPABILITY") != CAPABILITY:  # torch reads it once, when it loads
        os.execve(sys.executable, [sys.executable, "-m", "fastmask.bench.avx2_machine", *argv],
                  {**os.environ, "ATEN_CPU_CAPABILITY": CAPABILITY})
    import torch

    from fastmask import cli
    from fastmask.backends import cpp

    if torch.backends.cpu.get_cpu_capability() != "AVX2":
        raise SystemExit(f"torch runs its {torch.backends.cpu.get_cpu_capability()} kernels, not AVX2's: "
                         "this CPU has no AVX2")
    cpp.EXTENSION = cpp.rng_variant("avx2", cap_at_avx2=True)
    if argv[:1] == ["step-speed"]:
        import argparse

        from fastmask.demo.data import load
        from fastmask.demo.train import step_speed

        parser = argparse.ArgumentParser(prog="fastmask.bench.avx2_machine step-speed")
        parser.add_argument("--dataset", default="avdigits")
        args = parser.parse_args(argv[1:])
        ms = step_speed(load(args.dataset, None, 0))
        print(f"{args.dataset}, one step, median ms (torch on AVX2, cpp without AVX-512): "
              + ", ".join(f"{name} {t:.3f}" for name, t in ms.items()))
        return 0
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
