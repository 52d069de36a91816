"""What the Triton step would move and launch on a GPU, counted in Triton's interpreter.

Under ``TRITON_INTERPRET=1`` every ``tl.load``, ``tl.store`` and atomic a kernel executes goes
through the interpreter's builder. ``count()`` records the addresses each launch touches as
32-byte sectors (how a GPU moves memory: a sector read twice in one launch is counted once),
the launches, and every torch op the host issues around them (a ``TorchDispatchMode``). The
counts are exact and machine-independent: ``tests/bench/test_traffic.py`` pins them to
``BUDGETS``. The time derived from them (bytes / bandwidth + launches and device ops x launch
cost) is a **model**, labelled as such wherever it is printed; ``make gpu-check`` prints it
next to the measured step (DESIGN §5, "Counting without a GPU").
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastmask

from .suites import resnet18_shapes

SECTOR_BYTES = 32
H200_COPY_TBPS = 4.3  # default bandwidth of the model: a measured H200 device-to-device copy
LAUNCH_US = 5.0  # default cost of one kernel launch or device op in eager mode (H100/H200: 4-6 us)
RATIO = 0.5
SHAPE = (256, 256)  # the tensor whose bytes per element are counted
SEVERAL = [(16, 8), (4, 3, 3, 3), (64,), (10,)]  # a group of several small tensors (launch and op counts)
# two ResNet-18 encoders (audio, visual), as `fastmask bench`'s av-resnet18 set: the modelled step's size
AV_RESNET18_ELEMENTS = sum(math.prod(s) for s in resnet18_shapes(1) + resnet18_shapes(3))

aten = torch.ops.aten
ALLOCATIONS = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
               aten.new_empty_strided.default, aten.lift_fresh.default}
HOST_SYNCS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
PROFILER_MARKS = {"_record_function_enter_new", "_record_function_exit"}  # torch.optim's annotations: no device work

# name: (optimizer class, its arguments, the group's setting, modality group or dense group)
VARIANTS: dict[str, tuple[type, dict, float]] = {
    "dense": (fastmask.AMSSPlus, dict(base="adamw"), 1.0),
    "grad2": (fastmask.AMSSPlus, dict(base="adamw"), RATIO),
    "ema": (fastmask.AMSSPlus, dict(base="adamw", importance="ema"), RATIO),
    "row": (fastmask.AMSSPlus, dict(base="adamw", granularity="row"), RATIO),
    "exact": (fastmask.AMSS, dict(base="adamw", sampling="exact"), RATIO),
    "sgd": (fastmask.AMSSPlus, dict(base="sgd", momentum=0.9), RATIO),
    "ogm-ge": (fastmask.OGM, dict(base="adamw", ge=True), RATIO),
}

# What a change may not exceed, per variant and param dtype (256x256, ratio 0.5, masked="freeze"):
# bytes per element of the whole step (sectors), and per (group, device, dtype) batch the Triton
# launches and the other device ops (besides allocations and views). The counts are exact; the
# byte budgets sit just above them (metadata reads vary by a few hundredths), the launch and op
# budgets at them. DESIGN §5 sets the floors and the target of at most 3 launches and 3 other
# device ops per batch, which every variant but "exact" meets: pass 1, the reduce (which also
# solves the water levels, reading each tensor's 16 KB histogram) and pass 2; the histogram
# buffer's zero fill and the stats' column sum and its add. "exact" chooses its units on the
# host, one Gumbel-key launch per tensor: 3 + 4 launches for the 4 tensors of SEVERAL.
# variant: (B/elem fp32, B/elem bf16, launches per batch, device ops per batch fp32, bf16)
_BUDGET_TABLE = {
    "dense": (32.5, 24.5, 3, 2, 2),
    "grad2": (32.5, 24.5, 3, 3, 3),
    "ema": (44.5, 36.5, 3, 3, 3),
    "row": (18.0, 13.1, 3, 3, 3),
    "exact": (48.5, 40.5, 7, 55, 59),
    "sgd": (24.5, 16.5, 3, 3, 3),
    "ogm-ge": (32.5, 24.5, 3, 2, 2),
}
BUDGETS: dict[str, dict[str, dict[str, float]]] = {
    variant: {"float32": dict(bytes_per_element=b32, launches=launches, device_ops=ops32),
              "bfloat16": dict(bytes_per_element=b16, launches=launches, device_ops=ops16)}
    for variant, (b32, b16, launches, ops32, ops16) in _BUDGET_TABLE.items()
}


@dataclass
class KernelCount:
    launches: int = 0
    read_sectors: int = 0
    write_sectors: int = 0


@dataclass
class Count:
    """One step's counts: per kernel, and the host's torch ops by kind."""

    kernels: dict[str, KernelCount] = field(default_factory=dict)
    device_ops: Counter = field(default_factory=Counter)  # op name -> calls
    allocations: int = 0
    host_syncs: int = 0

    @property
    def launches(self) -> int:
        return sum(k.launches for k in self.kernels.values())

    def bytes_per_element(self, numel: int) -> tuple[float, float]:
        """(read, written) bytes per element of ``numel``, summed over the kernels."""
        reads = sum(k.read_sectors for k in self.kernels.values()) * SECTOR_BYTES / numel
        writes = sum(k.write_sectors for k in self.kernels.values()) * SECTOR_BYTES / numel
        return reads, writes


class _Recorder(TorchDispatchMode):
    """Records sectors per launch (patched interpreter builder) and the host's ops outside launches."""

    def __init__(self) -> None:
        super().__init__()
        self.count = Count()
        self._reads: list[np.ndarray] | None = None
        self._writes: list[np.ndarray] | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._reads is None:  # inside a launch, the interpreter's own copies are not the step's
            if func in ALLOCATIONS:
                self.count.allocations += 1
            elif func in HOST_SYNCS:
                self.count.host_syncs += 1
            elif not func.is_view and func is not aten.detach.default and func.__name__.split(".")[0] not in PROFILER_MARKS:
                self.count.device_ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))

    def touch(self, reads: bool, writes: bool, ptrs, mask) -> None:
        if self._reads is None:
            return
        addresses = np.asarray(ptrs.data).reshape(-1)
        if mask is not None:
            addresses = addresses[np.broadcast_to(np.asarray(mask.data), np.shape(ptrs.data)).reshape(-1)]
        sectors = addresses.astype(np.uint64) // SECTOR_BYTES
        if reads:
            self._reads.append(sectors)
        if writes:
            self._writes.append(sectors)

    @contextlib.contextmanager
    def launch(self, name: str) -> Iterator[None]:
        self._reads, self._writes = [], []
        try:
            yield
        finally:
            kernel = self.count.kernels.setdefault(name, KernelCount())
            kernel.launches += 1
            kernel.read_sectors += np.unique(np.concatenate(self._reads or [np.empty(0, np.uint64)])).size
            kernel.write_sectors += np.unique(np.concatenate(self._writes or [np.empty(0, np.uint64)])).size
            self._reads = self._writes = None


def _interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the traffic count runs the Triton kernels in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is imported (fastmask bench --traffic does)")
    from triton.runtime import interpreter

    return interpreter


@contextlib.contextmanager
def count() -> Iterator[Count]:
    """Count what the Triton kernels launched in this block read and write, and the host's ops."""
    interpreter = _interpreter()
    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    recorder = _Recorder()
    patched = {
        (builder, "create_masked_load"): lambda orig: lambda b, ptrs, mask, *a: (
            recorder.touch(True, False, ptrs, mask), orig(b, ptrs, mask, *a))[1],
        (builder, "create_masked_store"): lambda orig: lambda b, ptrs, value, mask, *a: (
            recorder.touch(False, True, ptrs, mask), orig(b, ptrs, value, mask, *a))[1],
        (builder, "create_atomic_rmw"): lambda orig: lambda b, op, ptr, val, mask, *a: (
            recorder.touch(True, True, ptr, mask), orig(b, op, ptr, val, mask, *a))[1],
        (builder, "create_atomic_cas"): lambda orig: lambda b, ptr, *a: (
            recorder.touch(True, True, ptr, None), orig(b, ptr, *a))[1],
    }

    def launch(orig):
        def run(self, *args, **kwargs):
            with recorder.launch(self.fn.__name__):
                return orig(self, *args, **kwargs)
        return run

    patched[(executor, "__call__")] = launch
    originals = {key: getattr(*key) for key in patched}
    try:
        for (owner, name), wrap in patched.items():
            setattr(owner, name, wrap(originals[(owner, name)]))
        with recorder:
            yield recorder.count
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


def _groups(variant: str, dtype: torch.dtype, shapes: list[tuple[int, ...]], n_groups: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    groups = []
    for i in range(n_groups):
        params = []
        for shape in shapes:
            p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(dtype))
            p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(dtype)
            params.append(p)
        _, _, setting = VARIANTS[variant]
        groups.append({"params": params} if setting >= 1.0 else {"params": params, "modality": f"m{i}"})
    return groups


def count_step(variant: str, dtype: torch.dtype = torch.float32, shapes: list[tuple[int, ...]] | None = None,
               n_groups: int = 1) -> Count:
    """The counts of one steady-state step (after a first step that creates the states and
    caches the pointer tables) of ``variant`` on ``n_groups`` groups of ``shapes``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    cls, kwargs, setting = VARIANTS[variant]
    groups = _groups(variant, dtype, shapes or [SHAPE], n_groups)
    opt = cls(groups, backend="triton", seed=0, **kwargs)
    settings = {cls.SETTING: {g["modality"]: setting for g in groups if "modality" in g}}
    # the interpreter computes masked-off lanes too (1/pi of unselected units): numpy's warnings
    # about them say nothing about the step
    with np.errstate(divide="ignore", invalid="ignore"):
        opt.step(**settings)
        with count() as counted:
            opt.step(**settings)
    return counted


@dataclass
class Row:
    """One line of the traffic table; ``model_*``: the modelled GPU time, not a measurement."""

    variant: str
    dtype: str
    read_bytes_per_element: float
    write_bytes_per_element: float
    bytes_per_element: float
    per_kernel: dict[str, list[float]]  # kernel -> [launches, read B/elem, written B/elem]
    launches_per_batch: int
    device_ops_per_batch: int
    device_ops: dict[str, int]
    host_syncs: int
    model_ms: float
    model_fused_adamw_ms: float
    model_ratio_vs_fused_adamw: float


def fused_adamw_bytes(dtype: torch.dtype) -> int:
    """torch's fused AdamW per element: reads p, g, m, v; writes p, m, v (fp32 states)."""
    p = torch.finfo(dtype).bits // 8
    return 3 * p + 4 * 4


def traffic_row(variant: str, dtype: torch.dtype, bandwidth_tbps: float = H200_COPY_TBPS,
                launch_us: float = LAUNCH_US) -> Row:
    numel = SHAPE[0] * SHAPE[1]
    single = count_step(variant, dtype)
    batches = 2  # launches and ops per batch: two groups of several tensors each
    several = count_step(variant, dtype, shapes=SEVERAL, n_groups=batches)
    reads, writes = single.bytes_per_element(numel)
    ops_per_batch = sum(several.device_ops.values()) // batches
    launches_per_batch = several.launches // batches
    per_step_us = (launches_per_batch + ops_per_batch) * launch_us * batches
    model_us = (reads + writes) * AV_RESNET18_ELEMENTS / (bandwidth_tbps * 1e6) + per_step_us
    adamw_us = fused_adamw_bytes(dtype) * AV_RESNET18_ELEMENTS / (bandwidth_tbps * 1e6) + batches * launch_us
    return Row(
        variant=variant, dtype=str(dtype).removeprefix("torch."), read_bytes_per_element=round(reads, 2),
        write_bytes_per_element=round(writes, 2), bytes_per_element=round(reads + writes, 2),
        per_kernel={name: [k.launches, round(k.read_sectors * SECTOR_BYTES / numel, 2),
                           round(k.write_sectors * SECTOR_BYTES / numel, 2)] for name, k in single.kernels.items()},
        launches_per_batch=launches_per_batch, device_ops_per_batch=ops_per_batch,
        device_ops=dict(several.device_ops), host_syncs=several.host_syncs,
        model_ms=round(model_us / 1e3, 4), model_fused_adamw_ms=round(adamw_us / 1e3, 4),
        model_ratio_vs_fused_adamw=round(model_us / adamw_us, 2),
    )


def table(rows: list[Row], bandwidth_tbps: float = H200_COPY_TBPS, launch_us: float = LAUNCH_US) -> str:
    """The Markdown traffic table (counted bytes and launches; a modelled time, labelled)."""
    lines = [
        f"Counted in Triton's interpreter: bytes per element of a {SHAPE[0]}x{SHAPE[1]} tensor as 32-byte sectors "
        f"(ratio {RATIO}, masked=\"freeze\"), launches and other device ops per (group, device, dtype) batch. "
        f"MODEL, not a measurement: {AV_RESNET18_ELEMENTS / 1e6:.1f} M elements (two ResNet-18 encoders, two "
        f"batches) at {bandwidth_tbps} TB/s plus {launch_us} us per launch or device op; fused AdamW modelled "
        "the same way (its bytes, one launch per batch).",
        "",
        "| variant | dtype | B/elem read | B/elem written | B/elem | budget | launches/batch | device ops/batch "
        "| model ms | model fused AdamW ms | model ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        budget = BUDGETS[r.variant][r.dtype]["bytes_per_element"]
        lines.append(f"| {r.variant} | {r.dtype} | {r.read_bytes_per_element} | {r.write_bytes_per_element} | "
                     f"{r.bytes_per_element} | {budget} | {r.launches_per_batch} | {r.device_ops_per_batch} | "
                     f"{r.model_ms} | {r.model_fused_adamw_ms} | {r.model_ratio_vs_fused_adamw} |")
    return "\n".join(lines)


def run(variants: list[str] | None = None, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
        bandwidth_tbps: float = H200_COPY_TBPS, launch_us: float = LAUNCH_US) -> list[Row]:
    return [traffic_row(v, d, bandwidth_tbps, launch_us) for v in (variants or list(VARIANTS)) for d in dtypes]


__all__ = ["BUDGETS", "VARIANTS", "Count", "Row", "count", "count_step", "run", "table", "traffic_row", "asdict"]
