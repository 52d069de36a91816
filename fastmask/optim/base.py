"""``FusedOptimizer``: the torch.optim contract shared by every fastmask optimizer.

What "drop-in" means here (DESIGN §2): param groups are dicts that may carry a
``"modality"``; every hyper-parameter can be overridden per group; per-param
0-d fp32 ``step`` and torch's state keys (``exp_avg``, ``exp_avg_sq``,
``momentum_buffer``) plus ``fisher``; closures, LR schedulers (float or Tensor
lr), ``maximize``, AMP (``grad_scale``/``found_inf``, also as the attributes
GradScaler sets); an atomic, validating ``load_state_dict`` (``checkpoint.py``).
Subclasses say which method keys they add and how a group becomes a ``StepConfig``. The group
keys and their checks: ``groups.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .. import ops
from ..ops.checks import FLOAT_DTYPES, check_choice, check_int, check_real
from ..backends.registry import requested_backend
from ..balancer import Balancer
from ..reference.spec import BASES, StepConfig, TensorBatch, step_config
from . import sharding
from .checkpoint import Checkpointing
from .groups import (BASE_DEFAULTS, BASE_FAMILY, DENSE, FOREIGN_KEYS, STATE_LISTS, agreed_seed, check_bool,
                     check_complex_group, checked_lr, drop_duplicates, nearest_key, split_names, state_dtype,
                     torch_checked)


class FusedOptimizer(Checkpointing, torch.optim.Optimizer):
    """Base class: validation, state, per-modality settings, AMP, stats and checkpoints.

    Each method takes one per-modality setting in ``step()``: AMSS the update
    fractions ``ratios``, OGM the gradient ``coefficients``. It is named by
    ``SETTING`` (the dict) and ``SETTING_LABEL`` (one value, and the param-group key
    that holds it: every group with a modality carries its current value, so it
    travels with the groups through ``state_dict``, ``deepcopy``, ``pickle`` and
    ``torch.distributed.checkpoint``). It defaults to 1.0 (a dense, unmodulated step)
    and persists until changed.
    """

    _step_supports_amp_scaling = True
    METHOD_DEFAULTS: dict[str, Any] = {}
    SETTING = "ratios"
    SETTING_LABEL = "ratio"
    SETTING_LOW_OPEN = True  # a ratio is in (0, 1]

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], *, balancer: Balancer | None = None,
                 unscale_in_step: bool = True, **hyper: Any) -> None:
        if isinstance(params, (set, torch.Tensor)):
            raise TypeError(f"params argument given to the optimizer should be an iterable of Tensors or dicts, but "
                            f"got {torch.typename(params)} (params must be an ordered iterable of tensors, "
                            f"(name, tensor) pairs or dicts)")
        base = check_choice("base", hyper.get("base", BASE_DEFAULTS["base"]), BASES)
        defaults = {**BASE_DEFAULTS, **BASE_FAMILY[base], **self.METHOD_DEFAULTS}
        for key in hyper:
            if key not in defaults:
                raise TypeError(f"{type(self).__name__} got an unexpected argument {key!r}{self._key_hint(key, base)}")
        defaults.update(hyper)
        if defaults["seed"] is None:
            defaults["seed"] = agreed_seed()
        self._stats: dict[str, dict[torch.device, torch.Tensor]] = {}
        self._dtensors = False  # set once a DTensor param is added: the step then handles shards
        self._balancer: Balancer | None = None
        # GradScaler leaves unscaling to a step that supports it (inside the kernel, no extra pass);
        # False lets it unscale first, so that gradients can be clipped between (Lightning refuses
        # gradient_clip_val under AMP for optimizers that unscale in their step, torch's fused Adam too)
        self._step_supports_amp_scaling = check_bool("unscale_in_step", unscale_in_step)
        self._validate_group(dict(defaults), "")
        super().__init__(params, defaults)
        if balancer is not None:
            self._attach(balancer)

    def _attach(self, balancer: Balancer) -> None:
        """Take this optimizer's settings from ``balancer`` at every bare ``step()``."""
        if not isinstance(balancer, Balancer):
            raise TypeError(f"balancer must be a fastmask.Balancer, got {type(balancer).__name__}")
        groups, measured = set(self.modalities()), set(balancer.modalities)
        if measured - groups:
            raise ValueError(f"the balancer measures {sorted(measured - groups)}, which no param group has "
                             f"(param group modalities: {sorted(groups)}; see fastmask.modality_groups)")
        if groups - measured:
            raise ValueError(f"param groups have modalities {sorted(groups - measured)}, which the balancer does "
                             f"not measure (its encoders: {sorted(measured)})")
        balancer.attach(self)
        self._balancer = balancer

    @property
    def balancer(self) -> Balancer | None:
        """The attached ``fastmask.Balancer``, or None."""
        return self._balancer

    # ----------------------------------------------------------- groups
    def _valid_keys(self, group: Mapping[str, Any]) -> set[str]:
        """The keys a param group of this optimizer may carry (its base's, its setting's, foreign ones)."""
        keys = {"params", "modality", *BASE_DEFAULTS, *BASE_FAMILY[group["base"]], *self.METHOD_DEFAULTS}
        if group.get("modality") is not None:
            keys.add(self.SETTING_LABEL)
        return keys | FOREIGN_KEYS

    def _key_hint(self, key: str, base: str) -> str:
        """Why ``key`` is not valid for a group with ``base``, and the nearest valid key."""
        if key not in BASE_FAMILY[base] and any(key in family for family in BASE_FAMILY.values()):
            owners = " or ".join(repr(b) for b, family in BASE_FAMILY.items() if key in family)
            return f": {key!r} belongs to base {owners}; base={base!r} takes {', '.join(BASE_FAMILY[base])}"
        if key == self.SETTING_LABEL:
            return f": it is set per modality, by step({self.SETTING}=...) or set_{self.SETTING}()"
        valid = {*BASE_DEFAULTS, *BASE_FAMILY[base], *self.METHOD_DEFAULTS, "modality", self.SETTING_LABEL}
        return nearest_key(key, valid)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group: missing keys come from the defaults (those of the group's base), its
        modality's current setting from the groups that share it; unknown keys raise."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("params must be an ordered collection (list), not a set")
        elif params is None:
            raise ValueError("param group has no 'params'")
        group["params"] = list(params)
        where = f" (param group {len(self.param_groups)})"
        split_names(group, where)
        for i, p in enumerate(group["params"]):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {torch.typename(p)}: "
                                f"params[{i}] must be a torch.Tensor or a (name, tensor) pair{where}")
            if p.is_sparse or p.layout != torch.strided:
                raise TypeError(f"params[{i}] is sparse; fastmask optimizers need dense params{where}")
            check_complex_group(p, group, f"params[{i}]{where}")
            if p.dtype == torch.complex64 and sharding.is_dtensor(p):
                raise TypeError(f"params[{i}] is a complex DTensor; fastmask steps complex params only as plain "
                                f"tensors{where}")
            if p.dtype not in FLOAT_DTYPES and p.dtype != torch.complex64:
                raise TypeError(f"params[{i}] has dtype {p.dtype}; fastmask needs float32, bfloat16, float16 or "
                                f"(in groups without modality) complex64 params{where}")
            if not (p.is_leaf or p.retains_grad):
                raise ValueError(f"params[{i}] is a non-leaf tensor; optimizers step leaf tensors such as "
                                 f"nn.Parameter{where}")
            if sharding.is_dtensor(p):
                sharding.shard_mesh_dim(p, f"params[{i}]{where}")
                self._dtensors = True
        base = check_choice(f"base{where}", group.get("base", self.defaults["base"]), BASES)
        family = BASE_FAMILY[base]
        for key in (*BASE_DEFAULTS, *family, *self.METHOD_DEFAULTS):
            if key not in group:
                # The family's own default when the defaults were made for another base.
                value = self.defaults.get(key, family.get(key))
                # A tensor lr is cloned so that schedulers, which write it in place, act per group.
                group[key] = value.clone() if isinstance(value, torch.Tensor) else value
        modality = group.get("modality")
        if isinstance(modality, str) and self.SETTING_LABEL not in group:
            group[self.SETTING_LABEL] = self._setting(modality)
        self._validate_group(group, where)
        if modality is not None and modality in self.modalities():
            current = self._setting(modality)
            value = group[self.SETTING_LABEL]
            if not isinstance(value, torch.Tensor) and not isinstance(current, torch.Tensor) and value != current:
                raise ValueError(f"{self.SETTING_LABEL} {group[self.SETTING_LABEL]} differs from modality {modality!r}'s "
                                 f"current {current}: the groups of one modality share it{where}")
        balancer = self._balancer  # None while the constructor adds its groups (attached after)
        if balancer is not None and modality is not None and modality not in balancer.modalities:
            raise ValueError(f"modality {modality!r} is not measured by the attached balancer (its encoders: "
                             f"{sorted(balancer.modalities)}){where}")
        for other in self.param_groups:
            if ("param_names" in group) != ("param_names" in other):
                raise ValueError(f"all optimizer param groups should be with/without names. cannot add param group "
                                 f"{'with' if 'param_names' in group else 'without'} names to the optimizer{where}")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in group["params"]):
            raise ValueError(f"some parameters appear in more than one parameter group{where}")
        if len({id(p) for p in group["params"]}) != len(group["params"]):
            drop_duplicates(group, where)
        self.param_groups.append(group)

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        """Check and normalise one group's hyper-parameters in place; errors name the key."""
        check_choice(f"base{where}", group["base"], BASES)
        unknown = sorted(set(group) - self._valid_keys(group))
        if unknown:
            raise ValueError(f"unknown param group key {unknown[0]!r}{where}{self._key_hint(unknown[0], group['base'])}")
        group["lr"] = checked_lr(group["lr"], where)
        if group["base"] == "sgd":
            group["momentum"] = torch_checked("Invalid momentum value", f"momentum{where}", group["momentum"], 0.0,
                                               math.inf)
            group["dampening"] = check_real(f"dampening{where}", group["dampening"], -math.inf, math.inf)
            check_bool(f"nesterov{where}", group["nesterov"])
            if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
                raise ValueError(f"nesterov needs momentum > 0 and dampening == 0{where}")
        else:
            betas = group["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}{where}")
            if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
                raise ValueError(f"betas must be either both floats or both Tensors, got {betas!r}{where}")
            group["betas"] = tuple(
                torch_checked(f"Invalid beta parameter at index {i}", f"betas[{i}]{where}", b, 0.0, 1.0,
                               high_open=True) for i, b in enumerate(betas)
            )
            group["eps"] = torch_checked("Invalid epsilon value", f"eps{where}", group["eps"], 0.0, math.inf)
        if group["weight_decay"] is None:
            group["weight_decay"] = 0.01 if group["base"] == "adamw" else 0.0
        group["weight_decay"] = torch_checked("Invalid weight_decay value", f"weight_decay{where}",
                                               group["weight_decay"], 0.0, math.inf)
        check_bool(f"maximize{where}", group["maximize"])
        group["seed"] = check_int(f"seed{where}", group["seed"], 0, 2**64)
        if group["backend"] is not None:
            requested_backend(group["backend"])
        modality = group.get("modality")
        if modality is not None and (not isinstance(modality, str) or not modality or modality == DENSE):
            raise ValueError(f"modality must be a non-empty string other than {DENSE!r}, got {modality!r}{where}")
        if self.SETTING_LABEL in group:
            group[self.SETTING_LABEL] = self._check_setting(f"{self.SETTING_LABEL}{where}", group[self.SETTING_LABEL])
        self._validate_method(group, where)

    def _validate_method(self, group: dict[str, Any], where: str) -> None:
        """Subclasses check their own keys here."""

    # ----------------------------------------------------------- per-modality settings
    def modalities(self) -> list[str]:
        """Modality names of the param groups, in order of first appearance."""
        return list(dict.fromkeys(g["modality"] for g in self.param_groups if g.get("modality") is not None))

    def _check_setting(self, label: str, value: object) -> float | torch.Tensor:
        """One setting value in (0, 1] (``SETTING_LOW_OPEN``; OGM allows 0): a float, or a
        one-element float tensor kept on its device (as a 0-d fp32 tensor), which the kernels
        read from memory with no host synchronisation. A CPU tensor's range is checked here;
        a device tensor's is not (reading it would synchronise)."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or not value.is_floating_point():
                raise TypeError(f"{label} must be a float or a one-element float tensor, got a {value.dtype} "
                                f"tensor of shape {tuple(value.shape)}")
            value = value.detach().reshape(()).to(torch.float32)
            if value.device.type == "cpu" and not torch.compiler.is_compiling():
                check_real(label, float(value), 0.0, 1.0, low_open=self.SETTING_LOW_OPEN)
            elif value.device.type == "cpu":  # traced: an assert in the graph, no float() (a graph break)
                low_ok = value > 0.0 if self.SETTING_LOW_OPEN else value >= 0.0
                torch._assert_async(low_ok & (value <= 1.0), f"{label} must be in the range of a {self.SETTING_LABEL}")
            return value
        return check_real(label, value, 0.0, 1.0, low_open=self.SETTING_LOW_OPEN)

    def _checked_settings(self, values: Mapping[str, float], known: set[str] | None = None,
                          source: str = "") -> dict[str, float]:
        """``values`` checked by modality; ``source`` prefixes the names in errors (e.g. "the balancer's ")."""
        if not isinstance(values, Mapping):
            raise TypeError(f"{self.SETTING} must be a dict of modality -> float, got {type(values).__name__}")
        known = set(self.modalities()) if known is None else known
        checked = {}
        for name, value in values.items():
            if name not in known:
                raise ValueError(
                    f"{self.SETTING} names modality {name!r}, which no param group has (known: {sorted(known)})"
                )
            checked[name] = self._check_setting(f"{source}{self.SETTING}[{name!r}]", value)
        return checked

    def _apply_settings(self, checked: Mapping[str, float]) -> None:
        """Write already-checked settings into every group of their modality."""
        for group in self.param_groups:
            modality = group.get("modality")
            if modality in checked:
                group[self.SETTING_LABEL] = checked[modality]

    def _set_settings(self, values: Mapping[str, float]) -> None:
        self._apply_settings(self._checked_settings(values))

    def _setting(self, modality: str | None) -> float:
        """The current setting of ``modality`` (1.0 for dense groups and until set)."""
        for group in self.param_groups:
            if modality is not None and group.get("modality") == modality and self.SETTING_LABEL in group:
                return group[self.SETTING_LABEL]
        return 1.0

    # ----------------------------------------------------------- step
    def _step_config(self, group: dict[str, Any]) -> StepConfig:
        """The StepConfig of one group for this step: the base optimizer's terms and the
        method's (``_method_terms``), built once (a step builds one per group)."""
        if group["base"] == "sgd":
            family = dict(momentum=group["momentum"], dampening=group["dampening"], nesterov=group["nesterov"])
        else:
            family = dict(beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"])
        return step_config(dict(base=group["base"], lr=group["lr"], weight_decay=group["weight_decay"],
                                maximize=group["maximize"], seed=group["seed"], **family,
                                **self._method_terms(group)))

    def _method_terms(self, group: dict[str, Any]) -> dict[str, Any]:
        """The method's StepConfig fields for ``group`` (subclasses: the ratio, the coefficient, ...)."""
        return {}

    def _needs_fisher(self, group: dict[str, Any]) -> bool:
        return False

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        keys: tuple[str, ...] = ("step",)
        if group["base"] in ("adam", "adamw"):
            keys += ("exp_avg", "exp_avg_sq")
        elif group.get("momentum"):
            keys += ("momentum_buffer",)
        if self._needs_fisher(group):
            keys += ("fisher",)
        return keys

    def _init_state(self, p: torch.Tensor, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """``p``'s state, with zeros for any of ``keys`` (its group's state keys) it lacks."""
        state = self.state[p]
        for key in keys:
            if key not in state:
                if key == "step":  # a plain tensor, also for DTensor params (as torch's optimizers)
                    state[key] = torch.zeros((), dtype=torch.float32, device=p.device)
                else:
                    state[key] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
        return state

    @staticmethod
    def _amp_tensor(name: str, value: torch.Tensor | None) -> torch.Tensor | None:
        if value is None:
            return None
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise TypeError(f"{name} must be a one-element tensor or None")
        return value.reshape(())

    @torch.no_grad()
    def _run_step(
        self,
        closure: Callable[[], Any] | None,
        settings: Mapping[str, float] | None,
        grad_scale: torch.Tensor | None,
        found_inf: torch.Tensor | None,
    ) -> Any:
        """The shared body of every ``step``: the closure, the checks, then one op call per batch.

        ``grad_scale``: grads are divided by it inside the step; ``found_inf``: if
        non-zero, nothing changes (params, states, steps, RNG position). Both
        default to the attributes ``torch.amp.GradScaler`` sets on the optimizer.
        Hyper-parameters were validated when their group was added or loaded; a step
        checks what may have changed since (``lr``, which schedulers write, the grads and
        the settings) before any tensor is written or any state created.
        """
        if isinstance(closure, Mapping):
            raise TypeError(f"step() takes a closure as its positional argument, got a dict; pass per-modality "
                            f"values by keyword: step({self.SETTING}={{...}})")
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable or None, got {type(closure).__name__}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        checked = self._checked_settings(settings) if settings is not None else {}
        grad_scale = self._amp_tensor("grad_scale", grad_scale if grad_scale is not None else getattr(self, "grad_scale", None))
        found_inf = self._amp_tensor("found_inf", found_inf if found_inf is not None else getattr(self, "found_inf", None))
        with_grads = []
        for gi, group in enumerate(self.param_groups):
            group["lr"] = checked_lr(group["lr"], f" (param group {gi})")
            with_grads.append(self._params_with_grads(group, gi))
        commit_balancer = None
        if settings is None and self._balancer is not None:
            # after the closure (its forward pass counts) and the checks; committed once the step
            # has run, so that a step that raises leaves the balancer as it was
            values, commit_balancer = self._balancer.prepare(self.SETTING)
            checked = self._checked_settings(values, source="the balancer's ")
        self._apply_settings(checked)

        slot = 0
        for group, present in zip(self.param_groups, with_grads):
            batches = self._init_group(group, present, slot)
            slot += len(group["params"])
            if not batches:
                continue
            config = self._step_config(group)
            for batch, process_groups in batches:
                device = batch.params[0].device
                config = config.to(device)  # tensor settings on another device (a copy, no sync)
                gs = grad_scale.to(device) if grad_scale is not None else None
                fi = found_inf.to(device) if found_inf is not None else None
                backend = group["backend"]
                if process_groups is None:
                    ops.masked_step_(batch, config, grad_scale=gs, found_inf=fi, backend=backend)
                    continue
                # shards of larger tensors: S, the GE std and the skip are the full tensor's
                sums, unit_importance = ops.masked_step_sums(batch, config, grad_scale=gs, backend=backend)
                sharding.all_reduce_sums(sums, process_groups)
                ops.masked_step_finish(batch, config, sums, unit_importance, grad_scale=gs, found_inf=fi,
                                       backend=backend)
        if commit_balancer is not None:
            commit_balancer()
        return loss

    def _params_with_grads(self, group: dict[str, Any], gi: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(index, param, grad) of the group's params that have a gradient, checked (torch's
        ``.grad`` setter already guarantees the param's shape, dtype and device)."""
        present = []
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.layout is not torch.strided:
                raise RuntimeError(f"param group {gi}, params[{i}] has a {g.layout} gradient; fastmask supports "
                                   f"dense (strided) gradients only")
            # (a label is formatted only for a param that a check applies to)
            if self._dtensors:
                sharding.check_steppable(p, group, f"param group {gi}, params[{i}]")
            if p.is_complex():
                check_complex_group(p, group, f"param group {gi}, params[{i}]")
            present.append((i, p, g))
        return present

    def _init_group(self, group: dict[str, Any], present: list[tuple[int, torch.Tensor, torch.Tensor]], slot0: int
                    ) -> list[tuple[TensorBatch, list[object] | None]]:
        """The (device, param dtype) batches of ``present`` (the group's params with grads, at
        their indices), each with its state, created on first use; ``slot0`` is the group's first
        param slot (the RNG stream input). DTensors enter as their local shards; each batch
        comes with the process group each of its tensors is sharded over, or None when it
        holds no shard."""
        keys = self._state_keys(group)
        required = frozenset(keys)
        lists = [(key, attr) for key, attr in STATE_LISTS if key in keys]
        state = self.state
        batches: dict[tuple[torch.device, torch.dtype], tuple[TensorBatch, list]] = {}
        shard_groups: dict[tuple[torch.device, torch.dtype], list[object]] = {}
        for i, p, grad in present:
            entry = state[p]
            if not required <= entry.keys():
                entry = self._init_state(p, keys)
            key = (p.device, p.dtype)
            found = batches.get(key)
            if found is None:
                batch = TensorBatch([], [], [], [], stats=self._stats_buffer(group, p.device))
                found = batches[key] = (batch, [(name, getattr(batch, attr).append) for name, attr in lists])
            batch, appenders = found
            if self._dtensors:  # any DTensor in this optimizer: every batch lists its shards
                p, grad, entry, shard, process_group = sharding.local_tensors(p, entry)
                batch.shards.append(shard)
                shard_groups.setdefault(key, []).append(process_group)
            if p.is_complex():  # stepped as its real view, as torch.optim steps complex params
                p, grad = torch.view_as_real(p), torch.view_as_real(grad)
                entry = {name: torch.view_as_real(entry[name]) for name, _ in appenders} | {"step": entry["step"]}
            batch.params.append(p)
            batch.grads.append(grad)
            batch.steps.append(entry["step"])
            batch.slots.append(slot0 + i)
            for name, append in appenders:
                append(entry[name])
        return [(batch, shard_groups[key] if any(batch.shards) else None) for key, (batch, _) in batches.items()]

    # ----------------------------------------------------------- stats
    def _stats_buffer(self, group: dict[str, Any], device: torch.device) -> torch.Tensor:
        """The [sum_pi, selected, units, skipped] accumulator of the group's modality on ``device``."""
        name = group.get("modality") or DENSE
        per_device = self._stats.setdefault(name, {})
        buf = per_device.get(device)
        if buf is None:
            buf = per_device[device] = torch.zeros(4, dtype=torch.float64, device=device)
        return buf

    def _stats_totals(self) -> dict[str, list[float]]:
        """Per stats key: [sum_pi, selected, units, skipped] summed over devices (synchronises)."""
        return {name: sum(buf.cpu() for buf in per_device.values()).tolist()
                for name, per_device in self._stats.items()}

    def stats(self) -> dict[str, dict[str, float]]:
        """Per modality (dense groups under "(dense)"): the setting (ratio or coefficient),
        expected_fraction (sum pi / N),
        realised_fraction (selected / N), units, skipped_tensors, all summed since the last
        ``reset_stats()``. Reads device counters: may synchronise."""
        out = {}
        for name, (sum_pi, selected, units, skipped) in self._stats_totals().items():
            out[name] = {
                self.SETTING_LABEL: float(self._setting(None if name == DENSE else name)),
                "expected_fraction": sum_pi / units if units else float("nan"),
                "realised_fraction": selected / units if units else float("nan"),
                "units": units,
                "skipped_tensors": int(skipped),
            }
        return out

    def reset_stats(self) -> None:
        for per_device in self._stats.values():
            for buf in per_device.values():
                buf.zero_()
