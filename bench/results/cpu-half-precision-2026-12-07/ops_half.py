"""The cpp low-level ops fisher_update_ and unbiased_rescale on 2^22 + 3 grads of each dtype:
median ms of 15 calls, one line per (op, dtype). Run from a worktree with its own extension cache:
PYTHONPATH=<tree> TORCH_EXTENSIONS_DIR=<cache> python ops_half.py <label>"""
import statistics
import sys
import time

import torch

from fastmask import ops

n = 2**22 + 3
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    g = torch.randn(n, generator=gen).to(dtype)
    f = torch.rand(n, generator=gen)
    x = g.float()
    pi = ops.inclusion_probs(x * x, 0.4, min_prob=0.05)
    mask = ops.sample_mask(pi, seed=1)
    cases = {"fisher_update_": lambda: ops.fisher_update_(f, g, 0.9, backend="cpp"),
             "unbiased_rescale": lambda: ops.unbiased_rescale(g, mask, pi, backend="cpp")}
    for name, fn in cases.items():
        fn()
        times = []
        for _ in range(15):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        print(f"{sys.argv[1]} {name} {str(dtype).removeprefix('torch.')} {statistics.median(times):.3f} ms")
