"""Host-side helpers shared by the native backends (triton, cpp, cuda): working copies,
exact-mode unit tables, the typed C++ step config, and building C++/CUDA extensions on first use."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from ..reference import sampling
from ..reference.philox import rng_stream
from ..reference.spec import StepConfig, TensorBatch, exact_count

BATCH_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "momentum_buffers", "fishers")


def working_copies(batch: TensorBatch) -> tuple[dict[str, list[torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Contiguous versions of every tensor a kernel touches, and the (original, copy) pairs
    to write back after the step: kernels index elements in logical (row-major) order."""
    work, write_back = {}, []
    for name in BATCH_LISTS:
        tensors = getattr(batch, name)
        if all(map(torch.Tensor.is_contiguous, tensors)):  # the usual case, without a Python loop
            work[name] = list(tensors)
            continue
        values = []
        for x in tensors:
            if x.is_contiguous():
                values.append(x)
            else:
                copy = x.contiguous()
                values.append(copy)
                if name != "grads":
                    write_back.append((x, copy))
        work[name] = values
    return work, write_back


def as_units(values: torch.Tensor) -> torch.Tensor:
    """Per-unit values as the contiguous fp32 tensor the native op kernels read."""
    return values.to(torch.float32).contiguous()


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
    work: dict, batch: TensorBatch, cfg: StepConfig, grad_scale: torch.Tensor | None, select: Selector
) -> tuple[torch.Tensor, list[int]]:
    """Exact (Gumbel-top-k) selection of every tensor into one per-unit weight table
    (0 = not selected, else the rescale weight); ``select(s_units, count, stream)`` picks
    the units. Returns the table and the unit offsets."""
    units, offsets = unit_layout(work["params"], cfg.granularity)
    device = work["params"][0].device
    ratio = float(cfg.ratio)  # exact counts are chosen on the host: a ratio tensor is read here
    table = torch.zeros(max(sum(units), 1), dtype=torch.float32, device=device)
    for t, g in enumerate(work["grads"]):
        if not units[t]:
            continue
        g32 = g.to(torch.float32)
        if grad_scale is not None:
            g32 = g32 / grad_scale
        s = sampling.fisher_update(work["fishers"][t], g32, cfg.fisher_beta) if work["fishers"] else g32 * g32
        s_units = sampling.unit_sums(s, cfg.granularity)
        stream = rng_stream(batch.steps[t] + 1, batch.slots[t])
        selected = select(s_units, exact_count(ratio, units[t]), stream)
        # a ratio of 1 is the base optimizer: every unit, weight 1
        weights = sampling.rescale_weights(s_units, None, cfg.unbiased, cfg.rescale) if ratio < 1.0 else None
        table[offsets[t] : offsets[t] + units[t]] = (
            selected.to(torch.float32) if weights is None else torch.where(selected, weights, 0.0)
        )
    return table, offsets


def native_config(extension: ModuleType, cfg: StepConfig, ema: bool, batch: TensorBatch) -> tuple[object, object]:
    """The typed C++ ``fastmask::KernelConfig`` of ``extension`` (cpp or cuda) for one batch,
    ``cfg.kernel_fields(ema)`` (an unknown field raises), and its ``fastmask::ShardSpaces``: for a
    sharded batch per tensor the full tensor's units and elements and the full-tensor index of
    its first local unit and element (else empty). Both are read-only to the bindings, and may be
    shared between calls: a plain StepConfig's typed config is kept (see _kept_kernel_config)."""
    config = (_kept_kernel_config if cfg.plain else _kernel_config)(extension, cfg, ema)
    if not any(batch.shards):
        return config, _unsharded(extension)
    shards = extension.ShardSpaces()
    spaces = [batch.index_space(i, cfg.granularity) for i in range(len(batch))]
    shards.first_units = [s.first_unit for s in spaces]
    shards.full_units = [s.units for s in spaces]
    shards.full_numels = [s.numel for s in spaces]
    shards.first_elements = [s.first_element for s in spaces]
    return config, shards


def _kernel_config(extension: ModuleType, cfg: StepConfig, ema: bool) -> object:
    config = extension.KernelConfig()
    for name, value in cfg.kernel_fields(ema).items():
        setattr(config, name, value)
    return config


# Per (extension, StepConfig, ema), keyed by value: a group whose hyper-parameters did not change
# since its last step reuses its typed config instead of setting its 27 fields again (about 9 us
# of a small model's per-group step). The 256 most recently used are kept: a scheduler that
# changes lr every step makes one per step.
_kept_kernel_config = functools.lru_cache(maxsize=256)(_kernel_config)


@functools.cache
def _unsharded(extension: ModuleType) -> object:
    return extension.ShardSpaces()


def csrc_dir() -> Path:
    spec = importlib.util.find_spec("fastmask.csrc")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("fastmask's C++ sources (fastmask.csrc) are not installed")
    return Path(list(spec.submodule_search_locations)[0])


BUILD_OWNER = "fastmask.owner"  # beside torch's lock file: "pid host" of the process building


def build_directory(name: str) -> Path:
    """Where extension ``name`` is built and cached: under TORCH_EXTENSIONS_DIR (else torch's
    default root), per Python and torch version."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}".replace("+", "_")
    path = Path(root) / "fastmask" / tag / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _owner(build_dir: Path) -> tuple[int, str] | None:
    try:
        pid, host = (build_dir / BUILD_OWNER).read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for_build_lock(build_dir: Path, timeout_s: float, poll_s: float = 0.5) -> None:
    """Return once no other process holds torch's build lock in ``build_dir``.

    torch's lock is an empty file; a build killed midway (Ctrl-C, a timeout) leaves it behind and
    every later ``load`` then waits on it forever, silently. fastmask records the building process
    beside it (``BUILD_OWNER``): a lock whose owner on this host is gone is removed, with a
    warning; one still held after ``timeout_s`` raises ``TimeoutError`` naming the file to remove.
    """
    lock = build_dir / "lock"
    deadline = time.monotonic() + timeout_s
    told = False
    while lock.exists():
        owner = _owner(build_dir)
        if owner is not None and owner[1] == socket.gethostname() and not _alive(owner[0]):
            lock.unlink(missing_ok=True)
            (build_dir / BUILD_OWNER).unlink(missing_ok=True)
            warnings.warn(f"fastmask: removed the build lock {lock}, left by process {owner[0]}, which is gone",
                          RuntimeWarning, stacklevel=2)
            return
        if time.monotonic() >= deadline:
            held = f" (held by process {owner[0]} on {owner[1]})" if owner else ""
            raise TimeoutError(
                f"waited {timeout_s:.0f} s for the build lock {lock}{held}; if no build is running, remove it "
                f"(rm {lock}) and retry; FASTMASK_BUILD_LOCK_TIMEOUT sets the wait in seconds"
            )
        if not told:
            print(f"fastmask: waiting for another process to finish building {build_dir.name} (lock {lock})",
                  file=sys.stderr, flush=True)
            told = True
        time.sleep(poll_s)


class JitExtension:
    """A C++/CUDA extension: the module ``prebuilt`` at install if there is one (setup.py builds
    ``fastmask._cpp`` with ``FASTMASK_BUILD_EXT=1``; None: never prebuilt), else compiled on
    first use with ``torch.utils.cpp_extension.load`` into ``build_directory(name)``.

    ``module()`` returns None when it cannot be built; ``error`` then says why, and one
    warning is issued. A first build says what it builds and where (on stderr); a build lock
    left by a killed build is handled by ``wait_for_build_lock`` (``FASTMASK_BUILD_LOCK_TIMEOUT``,
    default 900 s). ``FASTMASK_VERBOSE_BUILD=1`` shows the compiler output.
    """

    def __init__(self, name: str, prebuilt: str | None, sources: list[str], **load_kwargs) -> None:
        self.name, self.prebuilt, self.sources, self.load_kwargs = name, prebuilt, sources, load_kwargs
        self.error: str | None = None
        self._module: ModuleType | None = None
        self._tried = False
        self._lock = threading.Lock()

    def _build(self) -> ModuleType:
        if self.prebuilt is not None:
            try:
                return importlib.import_module(self.prebuilt)
            except ImportError:
                pass
        from torch.utils.cpp_extension import load

        root = csrc_dir()
        build_dir = build_directory(self.name)
        wait_for_build_lock(build_dir, float(os.environ.get("FASTMASK_BUILD_LOCK_TIMEOUT", "900")))
        first = not any(build_dir.glob(f"{self.name}*.so"))
        if first:
            print(f"fastmask: building the {self.name} extension in {build_dir} (first use: 1 to 2 minutes)",
                  file=sys.stderr, flush=True)
        start = time.monotonic()
        owner = build_dir / BUILD_OWNER
        me = f"{os.getpid()} {socket.gethostname()}"
        owner.write_text(me)
        try:
            module = load(name=self.name, sources=[str(root / s) for s in self.sources], build_directory=str(build_dir),
                          verbose=os.environ.get("FASTMASK_VERBOSE_BUILD") == "1", **self.load_kwargs)
        finally:
            if owner.exists() and owner.read_text() == me:
                owner.unlink(missing_ok=True)
        if first:
            print(f"fastmask: built {self.name} in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
        return module

    def module(self) -> ModuleType | None:
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    self._module = self._build()
                except Exception as exc:  # any build failure is reported, never hidden
                    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
                    self.error = f"build failed ({type(exc).__name__}: {lines[-1] if lines else exc})"
                    warnings.warn(
                        f"fastmask: the {self.name} extension could not be built: {self.error}; set "
                        "FASTMASK_VERBOSE_BUILD=1 for the compiler output",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            return self._module


class NativeStep:
    """The fused step of a compiled extension (cpp, cuda), whose methods those backends
    register as their ``masked_step_``, ``masked_step_sums`` and ``masked_step_finish``: each
    prepares the batch on the host (working copies, the typed config, exact-mode unit tables) and
    calls the extension's binding once. Water-filling: the binding solves the water levels
    itself, from ``sampling.level_events``' breakpoints (x, a, c).

    ``module()`` returns the extension. ``settings_in_memory``: it reads the ratio and
    coefficients from a device tensor (cuda, its argument after ``stats``); otherwise tensor
    settings are read on the host first (cpp: CPU tensors, no sync)."""

    def __init__(self, module: Callable[[], ModuleType], settings_in_memory: bool) -> None:
        self.module, self.settings_in_memory = module, settings_in_memory

    def inputs(self, batch: TensorBatch, cfg: StepConfig) -> tuple:
        """(cfg as the extension reads it, the working copies, their write-backs, the typed C++
        config and shard spaces)."""
        if not self.settings_in_memory:
            cfg = cfg.on_host()
        work, write_back = working_copies(batch)
        p_dtype = work["params"][0].dtype
        if any(g.dtype not in (p_dtype, torch.float32) for g in work["grads"]):  # the kernels' dtype pairs
            work["grads"] = [g.to(torch.float32) for g in work["grads"]]
        return cfg, work, write_back, *native_config(self.module(), cfg, bool(work["fishers"]), batch)

    def masked_step_(self, batch: TensorBatch, cfg: StepConfig, grad_scale, found_inf,
                     sums: torch.Tensor | None = None, unit_importance: torch.Tensor | None = None) -> None:
        """The whole step of a batch; with ``sums`` and ``unit_importance`` (``masked_step_sums``'s,
        all-reduced), only its finish."""
        cfg, work, write_back, config, shards = self.inputs(batch, cfg)
        device = work["params"][0].device
        events = list(sampling.level_events(cfg.min_prob, device)[1:]) if cfg.water_filling else []
        unit_weight, offsets = None, []
        if cfg.exact:
            unit_weight, offsets = exact_unit_weights(work, batch, cfg, grad_scale, reference_select(cfg.seed))
        lr = cfg.lr.to(torch.float32) if isinstance(cfg.lr, torch.Tensor) else None
        settings = (cfg.device_settings(device),) if self.settings_in_memory else ()
        self.module().masked_step(
            work["params"], work["grads"], batch.steps, work["exp_avgs"], work["exp_avg_sqs"],
            work["momentum_buffers"], work["fishers"], batch.slots, config, shards, lr, grad_scale, found_inf,
            unit_weight, offsets, batch.stats, *settings, sums, unit_importance, events,
        )
        for original, copy in write_back:
            original.copy_(copy)

    def masked_step_sums(self, batch: TensorBatch, cfg: StepConfig, grad_scale, handed_out: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 1 alone: (sums float64 [T, cfg.sums_width], unit_importance fp32).
        ``handed_out=False`` (cpp): only the extension's own finish reads the result, which reads
        only some of it: sum g and g^2 are left 0 without GE, and the unit importances no row
        fills are left unwritten."""
        cfg, work, _, config, shards = self.inputs(batch, cfg)
        if self.settings_in_memory:
            return self.module().masked_step_sums(
                work["params"], work["grads"], batch.steps, work["exp_avgs"], work["exp_avg_sqs"],
                work["momentum_buffers"], work["fishers"], batch.slots, config, shards, grad_scale,
                cfg.device_settings(work["params"][0].device),
            )
        return self.module().masked_step_sums(work["params"], work["grads"], work["fishers"], config, grad_scale,
                                              handed_out)

    def masked_step_finish(self, batch: TensorBatch, cfg: StepConfig, sums: torch.Tensor,
                           unit_importance: torch.Tensor, grad_scale, found_inf) -> None:
        """The reduce and pass 2 of a sharded batch, from its all-reduced pass-1 ``sums``."""
        self.masked_step_(batch, cfg, grad_scale, found_inf, sums, unit_importance)


def unit_level(s_units: torch.Tensor, ratio: float, sampling_mode: str, min_prob: float) -> tuple[float, float, bool]:
    """(x, p0, S is 0 or not finite) of one tensor's units, for the low-level ``inclusion_probs``
    ops of the cpp backend (read on the host: CPU tensors)."""
    degenerate = bool(sampling.degenerate(sampling.unit_total(s_units)))
    if sampling_mode != "poisson" or ratio >= 1.0:
        return 0.0, 0.0, degenerate
    x, p0 = sampling.water_level(sampling.unit_histogram(s_units)[None], ratio, min_prob)[0].tolist()
    return x, p0, degenerate


def reference_select(seed: int) -> Selector:
    """Exact-mode selection by the reference (Gumbel keys and top-k in torch)."""

    def select(s_units: torch.Tensor, count: int, stream: torch.Tensor) -> torch.Tensor:
        return sampling.exact_select(s_units, count, seed, stream)

    return select
