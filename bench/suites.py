"""The suites of ``fastmask bench``: shape sets, variants, baselines, timing, the byte model.

Every number is measured in the same run: the device's copy bandwidth, torch's fused
AdamW on the same shapes, then each variant and backend. Timing: CUDA events (or
``perf_counter`` on CPU) around single steps after warm-up; the median is reported.
GB/s uses the byte model of DESIGN §5 (bytes per element), with params and grads of the
run's dtype (fp32, bf16 or fp16): fastmask keeps its states in fp32, torch's AdamW in the
param's dtype.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import fastmask
from fastmask import ops
from fastmask.backends.registry import unavailable_reason

# DESIGN §5 byte model per element and step, as (accesses of a param or grad element, fp32
# bytes): e.g. AMSS+-AdamW reads g in pass 1, then reads p, g and writes p (4 accesses), and
# reads and writes its fp32 m, v (16 B): 32 B with fp32 params, 24 B with bf16. torch's AdamW
# keeps m, v in the param's dtype: 7 accesses.
BYTE_MODEL = {
    "torch-fused-adamw": (7, 0),
    "torch-adamw-forloop": (7, 0),
    "torch-adamw-foreach": (7, 0),
    "amss+-adamw-grad2": (4, 16),
    "amss+-adamw-grad2-row": (4, 16),
    "amss+-adamw-ema": (4, 24),  # and F read and written (fp32)
    "amss-sgd-grad2": (4, 8),  # the momentum buffer read and written
    "amss+-adamw-dense": (3, 16),  # ratio 1: the base AdamW step (its pre-pass reads g: 4 accesses moved)
    # baselines doing the amss+-adamw-grad2 work, credited with its model bytes
    "mask-op+fused-adamw": (4, 16),
    "reference-style-amss+": (4, 16),
}
# what this implementation moves: its "ema" pre-pass also reads F, the dense step's pre-pass g
ACTUAL_BYTE_MODEL = {**BYTE_MODEL, "amss+-adamw-ema": (4, 28), "amss+-adamw-dense": (4, 16)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bytes_per_element(variant: str, dtype: torch.dtype, actual: bool = False) -> int:
    """Bytes one step moves per element of ``variant`` with params and grads of ``dtype``; 0
    for a variant the model does not cover."""
    accesses, fp32_bytes = (ACTUAL_BYTE_MODEL if actual else BYTE_MODEL).get(variant, (0, 0))
    return accesses * torch.finfo(dtype).bits // 8 + fp32_bytes

VARIANTS = {
    "amss+-adamw-grad2": (fastmask.AMSSPlus, dict(base="adamw", lr=1e-3)),
    "amss+-adamw-grad2-row": (fastmask.AMSSPlus, dict(base="adamw", lr=1e-3, granularity="row")),
    "amss+-adamw-ema": (fastmask.AMSSPlus, dict(base="adamw", lr=1e-3, importance="ema")),
    "amss-sgd-grad2": (fastmask.AMSS, dict(base="sgd", lr=1e-2, momentum=0.9)),
    "amss+-adamw-dense": (fastmask.AMSSPlus, dict(base="adamw", lr=1e-3)),
}
RATIO = 0.5  # every modality's update fraction, except in the dense variant (1: what balancing-off costs)


def resnet18_shapes(in_channels: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a torchvision-style ResNet-18 encoder without its fc layer."""
    shapes = [(64, in_channels, 7, 7), (64,), (64,)]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first_in = c_in if block == 0 else c_out
            shapes += [(c_out, first_in, 3, 3), (c_out,), (c_out,), (c_out, c_out, 3, 3), (c_out,), (c_out,)]
            if block == 0 and (stride != 1 or c_in != c_out):
                shapes += [(c_out, c_in, 1, 1), (c_out,), (c_out,)]
        c_in = c_out
    return shapes


SHAPE_SETS = ("large", "av-resnet18", "small")


def shape_sets(device: torch.device, names: list[str] | None = None) -> list[tuple[str, dict]]:
    """(set name, modality -> shapes) cases; "dense" holds the unmasked head.

    large: one tensor of 2^26 and one of 2^28 elements (2^22 and 2^24 on CPU), timed
    separately; av-resnet18: two ResNet-18 encoders (audio 1-channel, visual 3-channel)
    and a 1024 -> 31 concat head; small: 2,000 tensors of 4,096 elements.
    """
    large = (2**26, 2**28) if device.type == "cuda" else (2**22, 2**24)
    cases = [("large", {"m": [(n,)]}) for n in large] + [
        ("av-resnet18", {"audio": resnet18_shapes(1), "visual": resnet18_shapes(3), "dense": [(31, 1024), (31,)]}),
        ("small", {"m": [(4096,)] * 2000}),
    ]
    return [case for case in cases if names is None or case[0] in names]


@dataclass
class Record:
    device: str
    shape_set: str
    backend: str
    variant: str
    numel: int
    n_tensors: int
    median_ms: float
    gbps: float
    pct_copy_bw: float
    ratio_vs_torch_fused_adamw: float
    bytes_per_element: int
    actual_bytes_per_element: int
    dtype: str = "fp32"  # the params' and grads'


class Timer:
    """Median milliseconds of ``fn`` after ``warmup`` calls (CUDA events on GPU)."""

    def __init__(self, device: torch.device, min_time_s: float = 0.5, max_iters: int = 50, min_iters: int = 5):
        self.device, self.min_time_s, self.max_iters, self.min_iters = device, min_time_s, max_iters, min_iters

    def __call__(self, fn: Callable[[], object], warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        times: list[float] = []
        start_all = time.perf_counter()
        while len(times) < self.min_iters or (
            time.perf_counter() - start_all < self.min_time_s and len(times) < self.max_iters
        ):
            if self.device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, timer: Timer) -> float:
    """Device copy bandwidth: bytes read + written by ``dst.copy_(src)`` over a large buffer."""
    n = 2**28 if device.type == "cuda" else 2**24
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * 4 * n / (ms * 1e-3) / 1e9


def _params(shapes: dict[str, list[tuple[int, ...]]], device: torch.device, seed: int = 0,
            dtype: torch.dtype = torch.float32):
    gen = torch.Generator(device=device).manual_seed(seed)
    groups = []
    for modality, shape_list in shapes.items():
        params = []
        for shape in shape_list:
            p = torch.nn.Parameter((torch.randn(shape, device=device, generator=gen) * 0.02).to(dtype))
            p.grad = (torch.randn(shape, device=device, generator=gen) * 1e-3).to(dtype)
            params.append(p)
        groups.append({"params": params} if modality == "dense" else {"params": params, "modality": modality})
    return groups


def _ratios(groups, variant: str = "") -> dict[str, float]:
    ratio = 1.0 if variant.endswith("-dense") else RATIO
    return {g["modality"]: ratio for g in groups if "modality" in g}


def _flat(groups) -> list[torch.nn.Parameter]:
    return [p for g in groups for p in g["params"]]


def torch_adamw_step(groups, **flags) -> Callable[[], None]:
    opt = torch.optim.AdamW(_flat(groups), lr=1e-3, **flags)
    return opt.step


def fastmask_step(groups, variant: str, backend: str) -> Callable[[], None]:
    cls, kwargs = VARIANTS[variant]
    opt = cls(groups, backend=backend, seed=0, **kwargs)
    ratios = _ratios(groups, variant)
    return lambda: opt.step(ratios=ratios)


def mask_op_then_fused_adamw(groups) -> Callable[[], None]:
    """Baseline: fastmask's mask ops per tensor, then ``torch._fused_adamw_`` on all of them."""
    params = _flat(groups)
    masked = {id(p) for g in groups if "modality" in g for p in g["params"]}
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=p.device) for p in params]

    def step() -> None:
        grads = []
        for p in params:
            g = p.grad
            if id(p) in masked:
                pi = ops.inclusion_probs(g * g, RATIO)
                mask = ops.sample_mask(pi, seed=0, stream=steps[0].to(torch.int64) + 1)
                g = ops.unbiased_rescale(g, mask, pi)
            grads.append(g)
        torch._foreach_add_(steps, 1.0)
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=1e-3, beta1=0.9, beta2=0.999,
                            weight_decay=1e-2, eps=1e-8, amsgrad=False, maximize=False)

    return step


def reference_style_amss(groups) -> Callable[[], None]:
    """Baseline as the paper's code: per layer, filter scores, torch.multinomial without
    replacement, mask (and 1/(p + 1/N) for AMSS+) multiplied into the grad, then torch AdamW."""
    masked = [p for g in groups if "modality" in g for p in g["params"] if p.dim() >= 2]
    opt = torch.optim.AdamW(_flat(groups), lr=1e-3)
    grads = {id(p): p.grad.clone() for p in masked}

    def step() -> None:
        for p in masked:
            p.grad.copy_(grads[id(p)])
            score = (p.grad**2).reshape(p.shape[0], -1).sum(1)
            n = score.numel()
            prob = score / score.sum()
            idx = torch.multinomial(prob, math.ceil(n * RATIO), replacement=False)
            mask = torch.zeros(n, device=p.device)
            mask[idx] = 1.0 / (prob[idx] + 1.0 / n)
            p.grad.mul_(mask.view(-1, *([1] * (p.dim() - 1))))
        opt.step()

    return step


def compiled_reference_step(groups) -> Callable[[], None]:
    """Baseline: ``torch.compile`` of the reference step (the "torch" backend)."""
    cls, kwargs = VARIANTS["amss+-adamw-grad2"]
    opt = cls(groups, backend="torch", seed=0, **kwargs)
    ratios = _ratios(groups)
    compiled = torch.compile(opt.step)
    return lambda: compiled(ratios=ratios)


def available_backends(device: torch.device) -> list[str]:
    """Backends to time: the fast ones that run here (never the Triton interpreter), then torch."""
    fast = [b for b in ("triton", "cuda", "cpp") if unavailable_reason(b, device) is None]
    if device.type == "cpu":
        fast = [b for b in fast if b != "triton"]
    return fast + ["torch"]


def run(
    device: torch.device,
    sets: list[str] | None = None,
    variants: list[str] | None = None,
    backends: list[str] | None = None,
    baselines: bool = True,
    compile_baseline: bool | None = None,
    log: Callable[[str], None] = print,
    timer: Timer | None = None,
    dtype: str = "fp32",
) -> list[Record]:
    """Times every (shape set, variant, backend) and the baselines, params and grads of ``dtype``
    (a key of DTYPES)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    timer = timer or Timer(device)
    variants = variants or list(VARIANTS)
    backends = backends or available_backends(device)
    compile_baseline = device.type == "cuda" if compile_baseline is None else compile_baseline
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'x86_64'})"
    copy_gbps = copy_bandwidth_gbps(device, timer)
    log(f"device {name}: measured copy bandwidth {copy_gbps:.1f} GB/s; params and grads {dtype}")
    records: list[Record] = []
    for set_name, shapes in shape_sets(device, sets):
        numel = sum(math.prod(s) for ss in shapes.values() for s in ss)
        n_tensors = sum(len(ss) for ss in shapes.values())

        def params() -> list[dict]:
            return _params(shapes, device, dtype=torch_dtype)

        def record(backend: str, variant: str, ms: float, fused_ms: float) -> Record:
            model = bytes_per_element(variant, torch_dtype)
            gbps = model * numel / (ms * 1e-3) / 1e9 if model else float("nan")
            rec = Record(name, set_name, backend, variant, numel, n_tensors, ms, gbps, 100 * gbps / copy_gbps,
                         ms / fused_ms, model, bytes_per_element(variant, torch_dtype, actual=True), dtype)
            log(f"  {set_name:12s} {variant:26s} {backend:8s} {ms:10.3f} ms  {gbps:8.1f} GB/s "
                f"{rec.pct_copy_bw:5.1f}% copy  x{rec.ratio_vs_torch_fused_adamw:.2f} vs fused AdamW")
            records.append(rec)
            return rec

        fused_ms = timer(torch_adamw_step(params(), fused=True))
        record("torch", "torch-fused-adamw", fused_ms, fused_ms)
        if baselines:
            for flag, label in ((dict(foreach=False), "torch-adamw-forloop"), (dict(foreach=True), "torch-adamw-foreach")):
                record("torch", label, timer(torch_adamw_step(params(), **flag)), fused_ms)
            record("torch", "mask-op+fused-adamw", timer(mask_op_then_fused_adamw(params())), fused_ms)
            if set_name == "av-resnet18":
                record("torch", "reference-style-amss+", timer(reference_style_amss(params())), fused_ms)
            if compile_baseline:
                try:
                    ms = timer(compiled_reference_step(params()), warmup=3)
                    record("torch.compile", "amss+-adamw-grad2", ms, fused_ms)
                except Exception as exc:  # a baseline that cannot be built here is reported, not hidden
                    log(f"  {set_name:12s} torch.compile baseline failed: {type(exc).__name__}: {exc}")
        for variant in variants:
            for backend in backends:
                if backend == "torch" and set_name == "small" and device.type == "cpu":
                    continue  # ~2000 tensors x ~30 ops each: minutes per step, nothing learned
                record(backend, variant, timer(fastmask_step(params(), variant, backend)), fused_ms)
    return records


__all__ = ["SHAPE_SETS", "Record", "Timer", "VARIANTS", "asdict", "available_backends", "run", "shape_sets"]
