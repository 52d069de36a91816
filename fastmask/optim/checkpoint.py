"""Checkpoints of a ``FusedOptimizer``: ``state_dict`` (torch's two entries plus
``"fastmask": {"version", "stats", "balancer"}``), pickling, and the atomic, validating
``load_state_dict``, which also takes version-1 checkpoints and those of ``torch.optim.SGD`` /
``Adam`` / ``AdamW``. A mixin: ``FusedOptimizer`` inherits it ahead of ``torch.optim.Optimizer``."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from ..ops.checks import check_real
from . import sharding
from .groups import ADAM_DEFAULTS, BASE_FAMILY, DENSE, SGD_DEFAULTS, STATE_KEYS, state_dtype

CHECKPOINT_VERSION = 2  # 1: settings in state_dict["fastmask"] and every base's keys in every group
# torch optimizers' implementation flags, found in torch checkpoints: dropped on load once checked.
TORCH_FLAGS = ("foreach", "fused", "capturable", "differentiable", "amsgrad", "decoupled_weight_decay")


def torch_group_base(group: Mapping[str, Any]) -> str | None:
    """The base of a torch.optim SGD / Adam / AdamW param group, from its keys; None if unknown.

    Adam and AdamW groups both carry betas; torch >= 2.6 tells them apart by
    ``decoupled_weight_decay``; an older Adam-family group could be either ("adam*").
    """
    if "betas" in group:
        if "decoupled_weight_decay" in group:
            return "adamw" if group["decoupled_weight_decay"] else "adam"
        return "adam*"
    if "momentum" in group and "dampening" in group:
        return "sgd"
    return None


def _without_torch_flags(saved: Mapping[str, Any], base: str, where: str) -> dict[str, Any]:
    """``saved`` without torch.optim's implementation flags, once they are checked to ask for
    nothing fastmask does not do: ``foreach``, ``fused`` and ``capturable`` choose an
    implementation (any value); ``amsgrad``, ``differentiable`` and a ``decoupled_weight_decay``
    that contradicts ``base`` change the math, and are refused."""
    if saved.get("amsgrad"):
        raise ValueError(f"{where} has amsgrad=True (a torch group); fastmask has no AMSGrad")
    if saved.get("differentiable"):
        raise ValueError(f"{where} has differentiable=True (a torch group); fastmask steps are not differentiable")
    decoupled = saved.get("decoupled_weight_decay")
    if decoupled is not None and base != "sgd" and bool(decoupled) != (base == "adamw"):
        raise ValueError(f"{where} has decoupled_weight_decay={decoupled}, which is base="
                         f"{'adamw' if decoupled else 'adam'}; this optimizer's group has base={base!r}")
    return {k: v for k, v in saved.items() if k not in TORCH_FLAGS}


class Checkpointing:
    """``state_dict`` / ``load_state_dict`` / pickling of a ``FusedOptimizer`` (which supplies
    ``SETTING``, ``SETTING_LABEL``, ``_validate_group``, ``_checked_settings``, ``_state_keys``,
    ``_stats_totals`` and the balancer)."""

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``"fastmask": {"version", "stats"}``.

        Everything a resumed step needs is in torch's two entries, so it survives
        ``torch.distributed.checkpoint`` (which keeps only those): the seed and each
        modality's setting (e.g. ``"ratio"``) in the param groups, the RNG position in
        each param's ``step``. The ``"fastmask"`` entry adds the ``stats()`` counters
        (diagnostics, summed over devices: reading them synchronises).
        """
        sd = super().state_dict()
        sd["fastmask"] = {"version": CHECKPOINT_VERSION, "stats": self._stats_totals()}
        if self._balancer is not None:
            sd["fastmask"]["balancer"] = self._balancer.state_dict()
        return sd

    def __getstate__(self) -> dict[str, Any]:
        """deepcopy / pickle keep the stats counters too (settings are in the groups)."""
        return {**super().__getstate__(), "_stats": self._stats,
                "_step_supports_amp_scaling": self._step_supports_amp_scaling}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.defaults.pop("differentiable", None)  # torch adds it; no fastmask group has that key
        self.__dict__.setdefault("_stats", {})
        self.__dict__.setdefault("_balancer", None)  # a copy takes no balancer: it hooks one model
        self._dtensors = any(sharding.is_dtensor(p) for g in self.param_groups for p in g["params"])

    def _group_from_checkpoint(self, group: dict[str, Any], saved: Mapping[str, Any], meta: Mapping[str, Any],
                               gi: int) -> tuple[dict[str, Any], bool]:
        """The group to load in place of ``group`` (validated by the caller), and whether
        ``saved`` is a torch.optim group. Keys a checkpoint lacks come from ``group``."""
        where = f"state_dict param_groups[{gi}]"
        current = {k: v for k, v in group.items() if k != "params"}
        if "base" in saved:  # a fastmask group
            new = dict(saved)
            if meta.get("version") == 1:
                # Version 1 wrote every base's keys into every group, and the settings beside the groups.
                other = (set(SGD_DEFAULTS) | set(ADAM_DEFAULTS)) - set(BASE_FAMILY.get(new["base"], {}))
                new = {k: v for k, v in new.items() if k not in other}
                if new.get("modality") is not None:
                    settings = meta.get(self.SETTING, {})
                    new[self.SETTING_LABEL] = settings.get(new["modality"], 1.0) if isinstance(settings, Mapping) else settings
            if new["base"] != group["base"]:
                raise ValueError(f"{where} has base={new['base']!r}; this optimizer's param group {gi} has "
                                 f"base={group['base']!r}")
            # a fastmask group that went through a torch optimizer carries torch's flags too
            new = _without_torch_flags(new, group["base"], where)
            return {**current, **new, "params": group["params"]}, False
        torch_base = torch_group_base(saved)
        if torch_base is None:
            raise ValueError(f"{where} is neither a fastmask group (it has no 'base') nor a torch.optim SGD, Adam "
                             f"or AdamW group (it has neither 'betas' nor 'momentum' and 'dampening')")
        if torch_base != group["base"] and not (torch_base == "adam*" and group["base"] != "sgd"):
            kind = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "adam*": "Adam/AdamW"}[torch_base]
            raise ValueError(f"{where} is a torch.optim.{kind} group; this optimizer's param group {gi} has "
                             f"base={group['base']!r}")
        new = _without_torch_flags(saved, group["base"], where)
        return {**current, **new, "params": group["params"]}, True

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a checkpoint atomically: everything is validated before anything changes.

        Takes this optimizer's own checkpoints, and those of ``torch.optim.SGD`` /
        ``Adam`` / ``AdamW`` with the same param groups and base: their hyper-parameters
        are loaded, the fastmask keys (modality, seed, ratio, method options) stay this
        optimizer's, and an SGD state, which has no ``step``, gets step 1 where it has a
        momentum buffer (so the buffer continues as torch's would) and 0 otherwise.
        States are cast to fp32 and moved to their param's device (a checkpoint
        loaded with ``map_location="cpu"`` resumes on GPU). Wrong shapes, dtypes,
        unknown or missing keys, another base or another number of groups raise
        ValueError/TypeError and leave the optimizer as it was.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = dict(hook_result)
        extra = sorted(set(state_dict) - {"state", "param_groups", "fastmask"})
        missing = sorted({"state", "param_groups"} - set(state_dict))
        if missing or extra:
            raise ValueError(f"state_dict has missing keys {missing} / unexpected keys {extra}")
        meta = state_dict.get("fastmask", {})
        if not isinstance(meta, Mapping):
            raise ValueError("state_dict['fastmask'] must be a mapping")
        version = meta.get("version", CHECKPOINT_VERSION)
        meta_keys = {"version", "stats", "balancer"} if version == CHECKPOINT_VERSION else {"version", self.SETTING}
        if version not in (1, CHECKPOINT_VERSION) or set(meta) - meta_keys:
            raise ValueError(f"state_dict['fastmask'] must be version 1 or {CHECKPOINT_VERSION} with keys "
                             f"{sorted(meta_keys)}; got version {version!r} with keys {sorted(meta)}")
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups) if isinstance(saved_groups, (list, tuple)) else 'no list of'} "
                f"param groups; this optimizer has {len(self.param_groups)}"
            )
        id_map: dict[Any, torch.Tensor] = {}
        new_groups, from_torch = [], set()
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(f"state_dict param_groups[{gi}] is not a group with a 'params' list")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param_groups[{gi}] has {len(saved['params'])} params in the state_dict and "
                    f"{len(group['params'])} in this optimizer"
                )
            id_map.update(zip(saved["params"], group["params"]))
            new_group, is_torch = self._group_from_checkpoint(group, saved, meta, gi)
            if new_group["seed"] is None:
                raise ValueError(f"state_dict param_groups[{gi}] has no seed")
            self._validate_group(new_group, f" (state_dict param_groups[{gi}])")
            new_groups.append(new_group)
            if is_torch:
                from_torch.update(id(p) for p in group["params"])
        group_of = {id(p): g for g in new_groups for p in g["params"]}

        saved_state = state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise ValueError("state_dict['state'] must be a mapping of param id -> state")
        new_state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)
        for pid, entry in saved_state.items():
            if pid not in id_map:
                raise ValueError(f"state_dict['state'] has an entry for param id {pid!r}, which no group lists")
            p = id_map[pid]
            new_state[p] = self._checked_param_state(entry, p, group_of[id(p)], pid, id(p) in from_torch)

        if version == 1:
            self._checked_settings(meta.get(self.SETTING, {}), {g.get("modality") for g in new_groups} - {None})
        stats = self._checked_stats(meta.get("stats", {}), new_groups)
        balancer_state = None
        if "balancer" in meta and self._balancer is not None:  # without a balancer, its state has no use
            balancer_state = self._balancer.validated_state(meta["balancer"])

        self.__setstate__({"state": new_state, "param_groups": new_groups})
        self._stats = stats
        if balancer_state is not None:
            self._balancer._apply(balancer_state)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _checked_stats(self, saved: object, groups: list[dict[str, Any]]) -> dict[str, dict[torch.device, torch.Tensor]]:
        """A checkpoint's stats counters, on the device of each key's first param."""
        if not isinstance(saved, Mapping):
            raise ValueError("state_dict['fastmask']['stats'] must be a mapping of modality -> 4 numbers")
        devices = {}
        for g in groups:
            if g["params"]:
                devices.setdefault(g.get("modality") or DENSE, g["params"][0].device)
        stats = {}
        for name, values in saved.items():
            if name not in devices:
                raise ValueError(f"state_dict['fastmask']['stats'] has {name!r}, which no param group has")
            if not isinstance(values, (list, tuple)) or len(values) != 4:
                raise ValueError(f"state_dict['fastmask']['stats'][{name!r}] must be 4 numbers")
            checked = [check_real(f"state_dict['fastmask']['stats'][{name!r}]", v, 0.0, math.inf) for v in values]
            device = devices[name]
            stats[name] = {device: torch.tensor(checked, dtype=torch.float64, device=device)}
        return stats

    def _checked_param_state(
        self, entry: object, p: torch.Tensor, group: dict[str, Any], pid: Any, from_torch: bool
    ) -> dict[str, torch.Tensor]:
        if not isinstance(entry, Mapping):
            raise ValueError(f"state of param {pid!r} must be a mapping, got {type(entry).__name__}")
        entry = {k: v for k, v in entry.items() if v is not None}  # torch SGD writes momentum_buffer=None
        if from_torch and group["base"] == "sgd" and entry and "step" not in entry:
            # torch's SGD keeps no step; step >= 1 makes a saved momentum buffer continue (DESIGN §3).
            entry["step"] = torch.tensor(1.0 if "momentum_buffer" in entry else 0.0)
        unknown = sorted(set(entry) - set(STATE_KEYS), key=str)
        if unknown:
            raise ValueError(f"state of param {pid!r} has unknown keys {unknown}")
        if entry and "step" not in entry:
            raise ValueError(f"state of param {pid!r} has no 'step'")
        required = [k for k in self._state_keys(group) if k not in ("momentum_buffer", "fisher")]
        absent = [k for k in required if entry and k not in entry]
        if absent:
            raise ValueError(f"state of param {pid!r} lacks {absent} needed by base={group['base']!r}")
        out = {}
        for key, value in entry.items():
            if key == "step" and not isinstance(value, torch.Tensor):
                value = torch.tensor(check_real(f"state[{pid!r}]['step']", value, 0.0, 2.0**24), dtype=torch.float32)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state[{pid!r}][{key!r}] must be a tensor, got {type(value).__name__}")
            if value.device.type == "meta" or value.is_sparse or (
                    value.is_complex() and (key == "step" or not p.is_complex())):
                raise ValueError(f"state[{pid!r}][{key!r}] must be a dense real tensor with data, got {value.device} "
                                 f"{value.layout} {value.dtype}")
            if key != "step" and p.is_complex() and not value.is_complex():
                raise TypeError(f"state[{pid!r}][{key!r}] must be complex, as its param, got {value.dtype}")
            if not (value.is_floating_point() or value.is_complex()) and not (
                    key == "step" and value.dtype in (torch.int64, torch.int32)):
                raise TypeError(f"state[{pid!r}][{key!r}] must be floating point, got {value.dtype}")
            if key == "step":
                if value.numel() != 1:
                    raise ValueError(f"state[{pid!r}]['step'] must have one element, got shape {tuple(value.shape)}")
                out[key] = value.detach().reshape(()).to(device=p.device, dtype=torch.float32).clone()
            else:
                if value.shape != p.shape:
                    raise ValueError(
                        f"state[{pid!r}][{key!r}] has shape {tuple(value.shape)}; its param has {tuple(p.shape)}"
                    )
                if sharding.is_dtensor(p):
                    out[key] = sharding.load_state_tensor(p, value.detach(), f"state[{pid!r}][{key!r}]")
                    continue
                if sharding.is_dtensor(value):
                    raise ValueError(f"state[{pid!r}][{key!r}] is a DTensor; its param is a plain tensor")
                moved = torch.empty_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
                out[key] = moved.copy_(value.detach())
        return out
