"""Compile every kernel and launchable specialisation for a GPU target, without a GPU.

``python -m fastmask.kernels.aot [--arch 90]`` compiles with Triton's bundled ptxas and
prints one line per kernel: a check that compiled Triton accepts the kernels (the
interpreter that runs them in CI accepts more). Run it without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import masked_step as ms
from . import units

# argument name -> Triton type; every other argument is an fp32 scalar
TYPES = {
    **dict.fromkeys(["grad_table", "ptr_table", "meta", "stream_ptr"], "*i64"),
    **dict.fromkeys(["block_tensor", "row_tensor"], "*i32"),
    **dict.fromkeys(["partials", "sums_out", "hist", "histograms", "levels", "hist_ptr", "level_ptr", "stat_rows",
                     "exact_counts", "min_prob_f64", "events_x"], "*fp64"),
    **dict.fromkeys(["events_a", "events_c"], "*i64"),
    **dict.fromkeys(["row_importance", "unit_weight", "scalars", "grad_scale_ptr",
                     "found_inf_ptr", "lr_ptr", "f_ptr", "g_ptr", "s_ptr", "out_ptr", "total_ptr", "keys_ptr",
                     "noise_ptr", "pi_ptr", "x_ptr", "settings_ptr"], "*fp32"),
    "m_ptr": "*i8",
    **dict.fromkeys(["seed_lo", "seed_hi", "n", "sums_width", "n_blocks", "n_events", "n_halvings"], "i64"),
}


def compile_kernel(fn, target: GPUTarget, **constexprs):
    signature = {name: "constexpr" if name in constexprs else TYPES.get(name, "fp32") for name in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                          options={"enable_fp_fusion": False})


def specialisations():
    """(name, kernel, constexprs) for every kernel, over the constexpr values the host uses."""
    for base, mask_mode, rescale in itertools.product((0, 1, 2), (0, 1, 2), (0, 1, 2)):
        yield f"pass2[base={base},mask={mask_mode},rescale={rescale}]", ms.pass2, dict(
            BASE=base, MASK_MODE=mask_mode, SAMPLING=rescale % 2, RESCALE=rescale, FREEZE=mask_mode != 0,
            EMA=base == 2, GE=base == 0, HAS_MOMENTUM=base == 0, NESTEROV=base == 0, MAXIMIZE=rescale == 2,
            HAS_SCALE=True, MODULATE_UPDATE=base == 1, ALIGNED=rescale != 1,
            P_DTYPE=tl.bfloat16 if base else tl.float32, G_DTYPE=tl.float16, BLOCK=ms.BLOCK_SIZE)
    for ema, dtype in ((False, tl.float32), (True, tl.bfloat16)):
        for hist in (False, True):
            common = dict(HAS_SCALE=True, EMA=ema, HIST=hist, G_DTYPE=dtype, BLOCK=ms.BLOCK_SIZE)
            yield f"pass1_blocks[ema={ema},hist={hist}]", ms.pass1_blocks, common
            yield f"pass1_rows[ema={ema},hist={hist}]", ms.pass1_rows, common
    # (mask mode, rows, exact, sampling, rescale, sharded): dense, element (whole and sharded), row
    # and exact batches; poisson sampling of a masked batch solves its water levels in the reduce
    for mask_mode, rows, exact, sampling, rescale, sharded in ((0, False, False, 0, 0, False),
                                                               (1, False, False, 0, 0, False),
                                                               (1, False, False, 0, 1, True),
                                                               (2, True, False, 0, 1, False),
                                                               (2, True, False, 1, 2, True),
                                                               (2, False, True, 0, 2, True)):
        water = mask_mode != 0 and not exact and sampling == 0
        yield (f"reduce_tensors[mask={mask_mode},rows={rows},exact={exact},sharded={sharded},water={water}]",
               ms.reduce_tensors, dict(
                   HAS_FOUND_INF=True, LR_IS_TENSOR=rows, MASK_MODE=mask_mode, ROW_SAMPLING=rows and not exact,
                   EXACT=exact, SAMPLING=sampling, RESCALE=rescale, PRE_SUMMED=sharded, WATER_LEVEL=water,
                   ALIGNED=not sharded, RBLOCK=ms.REDUCE_BLOCK))
    yield "sum_partials", ms.sum_partials, dict(RBLOCK=ms.REDUCE_BLOCK)
    block = dict(BLOCK=units.BLOCK_SIZE)
    yield "fisher_update", units.fisher_update_kernel, dict(G_DTYPE=tl.bfloat16, **block)
    yield "block_sums", units.block_sums_kernel, block
    yield "histogram", units.histogram_kernel, block
    for poisson in (True, False):
        yield f"probs[poisson={poisson}]", units.probs_kernel, dict(POISSON=poisson, **block)
    yield "select", units.select_kernel, block
    yield "gumbel", units.gumbel_kernel, block
    yield "rescale", units.rescale_kernel, block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for Hopper")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for name, fn, constexprs in specialisations():
        try:
            kernel = compile_kernel(fn, target, **constexprs)
            print(f"ok   {name}: {len(kernel.asm['cubin'])} B cubin, {kernel.metadata.shared} B shared")
        except Exception as exc:  # report every failing kernel, not only the first
            failures += 1
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:400]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
