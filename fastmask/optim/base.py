"""``FusedOptimizer``: the torch.optim contract shared by every fastmask optimizer.

What "drop-in" means here (DESIGN §2): param groups are dicts that may carry a
``"modality"``; every hyper-parameter can be overridden per group; per-param
0-d fp32 ``step`` and torch's state keys (``exp_avg``, ``exp_avg_sq``,
``momentum_buffer``) plus ``fisher``; closures, LR schedulers (float or Tensor
lr), ``maximize``, AMP (``grad_scale``/``found_inf``, also as the attributes
GradScaler sets); an atomic, validating ``load_state_dict``. Subclasses say
which method keys they add and how a group becomes a ``StepConfig``.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .. import ops
from ..ops.checks import FLOAT_DTYPES, check_choice, check_int, check_real
from ..backends.registry import requested_backend
from ..balancer import Balancer
from ..reference.philox import draw_seed
from ..reference.spec import BASES, StepConfig, TensorGroup
from . import sharding

DENSE = "(dense)"  # the stats() key of groups without a modality
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "momentum_buffer", "fisher")
# per-param state key -> the TensorGroup list that carries it to the op
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
# torch optimizers' implementation flags, found in torch checkpoints: dropped on load once checked.
TORCH_FLAGS = ("foreach", "fused", "capturable", "differentiable", "amsgrad", "decoupled_weight_decay")
CHECKPOINT_VERSION = 2  # 1: settings in state_dict["fastmask"] and every base's keys in every group


def agreed_seed() -> int:
    """``draw_seed()``, the same on every rank: under ``torch.distributed``, rank 0's (ranks
    often seed their generators differently; equal masks need equal seeds)."""
    seed = draw_seed()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [seed]
        torch.distributed.broadcast_object_list(box, src=0)
        seed = int(box[0])
    return seed


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _checked_lr(lr: object, where: str) -> float | torch.Tensor:
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
    return _torch_checked("Invalid learning rate", f"lr{where}", lr, 0.0, math.inf)


def _torch_checked(torch_words: str, name: str, value: object, low: float, high: float, **openness: bool) -> float:
    """``check_real``, with torch.optim's message (e.g. "Invalid momentum value: -0.5") in front
    of ours, so that code matching torch's errors keeps working."""
    try:
        return check_real(name, value, low, high, **openness)
    except ValueError as error:
        raise ValueError(f"{torch_words}: {value} ({error})") from None


def _nearest(key: str, valid: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the valid key closest to ``key``, or ''."""
    match = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


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


def _check_complex_group(p: torch.Tensor, group: Mapping[str, Any], label: str) -> None:
    """Complex params step as their real view in dense groups only: a masked group's units
    (rows, elements) are defined on real tensors, and a complex number is not split."""
    if p.is_complex() and group.get("modality") is not None:
        raise TypeError(f"{label} is complex, in a group of modality {group['modality']!r}: masked groups take "
                        f"real params only; put complex params in a group without modality (stepped as their "
                        f"view_as_real, as torch.optim does)")


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype of a param's state tensors: fp32, complex64 for a complex param (as torch's)."""
    return torch.complex64 if p.is_complex() else torch.float32


def _split_names(group: dict[str, Any], where: str) -> None:
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


def _drop_duplicates(group: dict[str, Any], where: str) -> None:
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


class FusedOptimizer(torch.optim.Optimizer):
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
        self._step_supports_amp_scaling = _check_bool("unscale_in_step", unscale_in_step)
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
        return _nearest(key, valid)

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
        _split_names(group, where)
        for i, p in enumerate(group["params"]):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {torch.typename(p)}: "
                                f"params[{i}] must be a torch.Tensor or a (name, tensor) pair{where}")
            if p.is_sparse or p.layout != torch.strided:
                raise TypeError(f"params[{i}] is sparse; fastmask optimizers need dense params{where}")
            _check_complex_group(p, group, f"params[{i}]{where}")
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
            _drop_duplicates(group, where)
        self.param_groups.append(group)

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        """Check and normalise one group's hyper-parameters in place; errors name the key."""
        check_choice(f"base{where}", group["base"], BASES)
        unknown = sorted(set(group) - self._valid_keys(group))
        if unknown:
            raise ValueError(f"unknown param group key {unknown[0]!r}{where}{self._key_hint(unknown[0], group['base'])}")
        group["lr"] = _checked_lr(group["lr"], where)
        if group["base"] == "sgd":
            group["momentum"] = _torch_checked("Invalid momentum value", f"momentum{where}", group["momentum"], 0.0,
                                               math.inf)
            group["dampening"] = check_real(f"dampening{where}", group["dampening"], -math.inf, math.inf)
            _check_bool(f"nesterov{where}", group["nesterov"])
            if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
                raise ValueError(f"nesterov needs momentum > 0 and dampening == 0{where}")
        else:
            betas = group["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}{where}")
            if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
                raise ValueError(f"betas must be either both floats or both Tensors, got {betas!r}{where}")
            group["betas"] = tuple(
                _torch_checked(f"Invalid beta parameter at index {i}", f"betas[{i}]{where}", b, 0.0, 1.0,
                               high_open=True) for i, b in enumerate(betas)
            )
            group["eps"] = _torch_checked("Invalid epsilon value", f"eps{where}", group["eps"], 0.0, math.inf)
        if group["weight_decay"] is None:
            group["weight_decay"] = 0.01 if group["base"] == "adamw" else 0.0
        group["weight_decay"] = _torch_checked("Invalid weight_decay value", f"weight_decay{where}",
                                               group["weight_decay"], 0.0, math.inf)
        _check_bool(f"maximize{where}", group["maximize"])
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
        """The StepConfig of one group for this step; subclasses add their terms."""
        if group["base"] == "sgd":
            family = dict(momentum=group["momentum"], dampening=group["dampening"], nesterov=group["nesterov"])
        else:
            family = dict(beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"])
        return StepConfig(
            base=group["base"],
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            seed=group["seed"],
            **family,
        )

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
                    state[key] = torch.zeros_like(p, dtype=_state_dtype(p), memory_format=torch.preserve_format)
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
            group["lr"] = _checked_lr(group["lr"], f" (param group {gi})")
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
            if self._dtensors:
                sharding.check_steppable(p, group, f"param group {gi}, params[{i}]")
            _check_complex_group(p, group, f"param group {gi}, params[{i}]")
            present.append((i, p, g))
        return present

    def _init_group(self, group: dict[str, Any], present: list[tuple[int, torch.Tensor, torch.Tensor]], slot0: int
                    ) -> list[tuple[TensorGroup, list[object] | None]]:
        """The (device, param dtype) batches of ``present`` (the group's params with grads, at
        their indices), each with its state, created on first use; ``slot0`` is the group's first
        param slot (the RNG stream input). DTensors enter as their local shards; each batch
        comes with the process group each of its tensors is sharded over, or None when it
        holds no shard."""
        keys = self._state_keys(group)
        required = frozenset(keys)
        lists = [(key, attr) for key, attr in STATE_LISTS if key in keys]
        state = self.state
        batches: dict[tuple[torch.device, torch.dtype], tuple[TensorGroup, list]] = {}
        shard_groups: dict[tuple[torch.device, torch.dtype], list[object]] = {}
        for i, p, grad in present:
            entry = state[p]
            if not required <= entry.keys():
                entry = self._init_state(p, keys)
            key = (p.device, p.dtype)
            found = batches.get(key)
            if found is None:
                batch = TensorGroup([], [], [], [], stats=self._stats_buffer(group, p.device))
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

    # ----------------------------------------------------------- checkpoints
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
                moved = torch.empty_like(p, dtype=_state_dtype(p), memory_format=torch.preserve_format)
                out[key] = moved.copy_(value.detach())
        return out
