"""What a fastmask param group holds and how its entries are checked: the keys of every group
and of each base, the keys other libraries write into groups, and the validation helpers
``FusedOptimizer`` uses on ``add_param_group``, ``step`` and ``load_state_dict``."""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..ops.checks import check_real
from ..reference.philox import draw_seed

DENSE = "(dense)"  # the stats() key of groups without a modality
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "momentum_buffer", "fisher")
# per-param state key -> the TensorBatch list that carries it to the op
STATE_LISTS = (("exp_avg", "exp_avgs"), ("exp_avg_sq", "exp_avg_sqs"), ("momentum_buffer", "momentum_buffers"),
               ("fisher", "fishers"))

# Keys of every group, whatever its base.
BASE_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "base": "adamw",
    "weight_decay": None,  # None: the base's torch default (0.01 for adamw, else 0)
    "maximize": False,
    "seed": None,  # None: drawn from torch's default CPU generator
    "backend": None,  # None: FASTMASK_BACKEND, else "auto"
}
# Keys a group carries for its base, as torch's SGD / Adam / AdamW groups do: LR schedulers
# that cycle momentum (OneCycleLR, CyclicLR) look for "momentum" or "betas" to choose what to cycle.
SGD_DEFAULTS: dict[str, Any] = {"momentum": 0.0, "dampening": 0.0, "nesterov": False}
ADAM_DEFAULTS: dict[str, Any] = {"betas": (0.9, 0.999), "eps": 1e-8}
BASE_FAMILY: dict[str, dict[str, Any]] = {"sgd": SGD_DEFAULTS, "adam": ADAM_DEFAULTS, "adamw": ADAM_DEFAULTS}
# Keys that LR schedulers and training frameworks write into param groups: allowed, unused by the step.
FOREIGN_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "name", "param_names",
                          "swa_lr"})


def agreed_seed() -> int:
    """``draw_seed()``, the same on every rank: under ``torch.distributed``, rank 0's (ranks
    often seed their generators differently; equal masks need equal seeds)."""
    seed = draw_seed()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [seed]
        torch.distributed.broadcast_object_list(box, src=0)
        seed = int(box[0])
    return seed


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def checked_lr(lr: object, where: str) -> float | torch.Tensor:
    """A float >= 0, or a one-element float tensor (checked for >= 0 on the CPU only: no sync;
    under torch.compile by an assert in the graph)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element: lr has shape {tuple(lr.shape)}{where}")
        if not lr.is_floating_point():
            raise TypeError(f"lr must be a float or a one-element float tensor{where}")
        if lr.device.type == "cpu" and torch.compiler.is_compiling():  # traced: an assert, no float()
            torch._assert_async(lr >= 0, f"lr must be >= 0{where}")
        elif lr.device.type == "cpu" and float(lr) < 0:
            raise ValueError(f"Invalid learning rate: {float(lr)} (lr must be >= 0{where})")
        return lr
    return torch_checked("Invalid learning rate", f"lr{where}", lr, 0.0, math.inf)


def torch_checked(torch_words: str, name: str, value: object, low: float, high: float, **openness: bool) -> float:
    """``check_real``, with torch.optim's message (e.g. "Invalid momentum value: -0.5") in front
    of ours, so that code matching torch's errors keeps working."""
    try:
        return check_real(name, value, low, high, **openness)
    except ValueError as error:
        raise ValueError(f"{torch_words}: {value} ({error})") from None


def nearest_key(key: str, valid: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the valid key closest to ``key``, or ''."""
    match = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_complex_group(p: torch.Tensor, group: Mapping[str, Any], label: str) -> None:
    """Complex params step as their real view in dense groups only: a masked group's units
    (rows, elements) are defined on real tensors, and a complex number is not split."""
    if p.is_complex() and group.get("modality") is not None:
        raise TypeError(f"{label} is complex, in a group of modality {group['modality']!r}: masked groups take "
                        f"real params only; put complex params in a group without modality (stepped as their "
                        f"view_as_real, as torch.optim does)")


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype of a param's state tensors: fp32, complex64 for a complex param (as torch's)."""
    return torch.complex64 if p.is_complex() else torch.float32


def split_names(group: dict[str, Any], where: str) -> None:
    """torch.optim's named parameters: (name, tensor) pairs become ``params`` and
    ``param_names``; all or none of a group's params must be named."""
    pairs = [p for p in group["params"] if isinstance(p, tuple)]
    if not pairs:
        return
    if len(pairs) != len(group["params"]):
        raise ValueError(f"all optimizer params should be with/without names. Some param names are missing{where}")
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise TypeError(f"params[{i}] must be a (name, tensor) pair, got a tuple of {len(pair)}{where}")
    group["param_names"] = [name for name, _ in pairs]
    group["params"] = [p for _, p in pairs]


def drop_duplicates(group: dict[str, Any], where: str) -> None:
    """torch.optim warns about a parameter listed twice in one group; a fused step would update
    it twice in one launch, so each is kept once (its first place), with the same warning."""
    warnings.warn("optimizer contains a parameter group with duplicate parameters; in future, this will cause an "
                  f"error; see github.com/pytorch/pytorch/issues/40967 for more information. fastmask steps each "
                  f"of them once{where}", stacklevel=4)
    keep, seen = [], set()
    for i, p in enumerate(group["params"]):
        if id(p) not in seen:
            seen.add(id(p))
            keep.append(i)
    group["params"] = [group["params"][i] for i in keep]
    if "param_names" in group:
        group["param_names"] = [group["param_names"][i] for i in keep]
