"""``fastmask.Balancer``: the balancing methods made drop-in.

Declared once from the modality encoders and the fusion head, the balancer hooks the model's
forward pass, measures each modality's significance on device from what it sees (and the
labels), and hands the optimizer it is attached to (``balancer=``) the values of each step:
AMSS / AMSS+ update fractions (``ratios``) from the mutual-information rate, OGM coefficients
from the discrepancy ratio. Micro-batches between two steps are pooled; under
``torch.distributed`` the statistics are summed over the ranks first, so every replica gets
the same values. Nothing on this path reads a device value on the host.

Usage (the bare loop; Lightning and the Hugging Face Trainer need nothing more)::

    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    opt = fastmask.AMSSPlus(fastmask.modality_groups(model, {"audio": "audio", "visual": "visual"}),
                            lr=1e-3, balancer=balancer)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        balancer.observe(y)
        opt.zero_grad(); loss.backward(); opt.step()
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import significance
from .ops.checks import check_choice, check_int, check_real
from .trace import BalanceTrace

__all__ = ["Balancer", "modality_groups"]

# Sufficient statistics per modality, after the sample count and the C label counts.
LOG_Q, FEATURE_ENTROPY, TRUE_PROB, CORRECT = range(4)
PER_MODALITY = 4


class Balancer:
    """Per-step modality significance from the model's own forward pass.

    Args:
        encoders: modality name -> the module whose output is that modality's feature vector
            ``[batch, dim]``, in the order in which the head concatenates them.
        head: the fusion head. An ``nn.Linear`` over the concatenated features (concat fusion:
            uni-modal logits from its column slices and bias / M, no extra forward); a mapping
            modality -> ``nn.Linear`` or a ``fastmask.nn.AuxiliaryHeads`` (one classifier per
            modality, e.g. sum fusion); or None with ``fusion=``.
        fusion: for any other fusion, a callable taking the features dict and returning the
            fused logits; uni-modal logits are ``fusion`` with the other modalities zeroed.
        pool: modality -> callable turning its encoder's output into the feature vector
            ``[batch, dim]`` the head receives, for encoders that return more (a Hugging Face
            ``ModelOutput``, a sequence): e.g. ``{"text": lambda out: out.last_hidden_state[:, 0]}``.
        labels_from: a module whose forward receives ``labels=`` (the Hugging Face convention):
            labels are taken from there after each training-mode forward; else call
            ``observe(labels)`` after the forward pass.
        temperature, bounds, bias, fallback: the AMSS ratios
            rho_m = clip(1 - softmax(MIR / temperature)_m + bias, *bounds); ``fallback`` for
            every modality when a rate is not finite.
        alpha, form, rule: the OGM coefficients k_m = 1 - tanh(alpha * rho_m) (``form="cvpr"``)
            or 1 - tanh(alpha * (rho_m - 1)) (``"continuous"``) where the discrepancy ratio
            rho_m > 1, else 1; ``rule`` combines M > 2 modalities ("mean" or "min").
        start, end: modulate only on steps ``start <= t < end`` (t counts this balancer's
            steps from 0); outside, every value is 1 (a dense, unmodulated step).
        smoothing: values are an exponential moving average across steps,
            v_t = smoothing * v_{t-1} + (1 - smoothing) * value_t (0: none).
        process_group: the group to all-reduce the statistics over (default: the world,
            when ``torch.distributed`` is initialised).
        history_size: buckets of ``history()`` (even, >= 2): when full, neighbours merge, so a
            long run keeps its whole span at half the resolution.
        check_head: verify at the head's input (a forward pre-hook) that the captured features
            are what the head receives, in that order (a concat head: their concatenation);
            a mismatch (encoder order, pooling, a transform in between, a missing or extra
            modality) raises. ``False`` turns the check off, e.g. when dropout or OPM between
            the encoders and the head changes the features on purpose.

    What is captured: the encoders' outputs of a training-mode forward with gradients
    enabled, outside backward. Forwards in eval mode, under ``torch.no_grad()`` or
    ``torch.inference_mode()`` (a metric or logging pass), and activation checkpointing's
    recomputation are not captured. Each captured forward must be paired with its labels by
    ``observe()`` before the next one: micro-batches of gradient accumulation are pooled by
    observing each; a second captured forward before ``observe()`` raises.

    A batch whose statistics are not finite (a NaN or inf in a modality's features or
    logits) is dropped with a warning (once; later ones are counted in ``stats()``); a step
    with no good batch, or whose values are not finite, hands the optimizer the last good
    values (the rule's fallback before any: ``fallback`` for ratios, 1 for coefficients)
    and changes neither ``steps`` nor the smoothed values.

    The functions of ``fastmask.significance`` compute the same quantities from one batch
    (the manual path); here the statistics of every micro-batch and rank since the last
    step are pooled first.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        head: nn.Module | Mapping[str, nn.Module] | None = None,
        *,
        fusion: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
        pool: Mapping[str, Callable[[Any], torch.Tensor]] | None = None,
        labels_from: nn.Module | None = None,
        temperature: float = 0.2,
        bounds: tuple[float, float] = (0.1, 0.9),
        bias: float = 0.0,
        fallback: float = 0.5,
        alpha: float = 0.8,
        form: str = "cvpr",
        rule: str = "mean",
        start: int = 0,
        end: int | None = None,
        smoothing: float = 0.0,
        process_group: Any = None,
        check_head: bool = True,
        history_size: int = 256,
    ) -> None:
        if not isinstance(encoders, Mapping) or len(encoders) < 2:
            raise TypeError("encoders must be a dict of at least two modality -> nn.Module")
        for m, module in encoders.items():
            if not isinstance(m, str) or not m:
                raise TypeError(f"encoders keys must be non-empty modality names, got {m!r}")
            if not isinstance(module, nn.Module):
                raise TypeError(f"encoders[{m!r}] must be an nn.Module, got {type(module).__name__}")
        self.modalities: tuple[str, ...] = tuple(encoders)
        pool = dict(pool or {})
        for m, fn in pool.items():
            if m not in encoders:
                raise ValueError(f"pool names {m!r}, which is not one of the encoders {sorted(encoders)}")
            if not callable(fn):
                raise TypeError(f"pool[{m!r}] must be callable, got {type(fn).__name__}")
        self._pool = pool
        self._heads = self._check_head(head, fusion)
        self._head, self._fusion = head, fusion
        self.temperature = check_real("temperature", temperature, 0.0, math.inf, low_open=True, high_open=True)
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise ValueError(f"bounds must be a pair (low, high), got {bounds!r}")
        low = check_real("bounds[0]", bounds[0], 0.0, 1.0, low_open=True)
        self.bounds = (low, check_real("bounds[1]", bounds[1], low, 1.0))
        self.bias = check_real("bias", bias, -1.0, 1.0)
        self.fallback = check_real("fallback", fallback, 0.0, 1.0, low_open=True)
        self.alpha = check_real("alpha", alpha, 0.0, math.inf, high_open=True)
        self.form = check_choice("form", form, ("cvpr", "continuous"))
        self.rule = check_choice("rule", rule, ("mean", "min"))
        self.start = check_int("start", start, 0, 2**62)
        self.end = None if end is None else check_int("end", end, self.start, 2**62)
        self.smoothing = check_real("smoothing", smoothing, 0.0, 1.0, high_open=True)
        self.process_group = process_group
        history_size = check_int("history_size", history_size, 2, 2**20)
        if history_size % 2:
            raise ValueError(f"history_size must be even (buckets merge in pairs), got {history_size}")
        self._trace = BalanceTrace(self.modalities, history_size)
        if not isinstance(check_head, bool):
            raise TypeError(f"check_head must be a bool, got {type(check_head).__name__}")

        # Counters and values live on the statistics' device (moved there at the first observe), so
        # that a step never reads them on the host: steps taken with good values (the window's t),
        # per kind the smoothed values (NaN: none yet) and the last good values handed out.
        self._steps = torch.zeros((), dtype=torch.int64)
        self._smoothed: dict[str, torch.Tensor] = {}
        self._last: dict[str, torch.Tensor] = {}
        # float64 [M + 2]: batches dropped for a non-finite statistic of each modality, batches
        # dropped, steps that handed out the last good values; read on the host only when asked.
        self._counts = torch.zeros(len(self.modalities) + 2, dtype=torch.float64)
        self._warned = False
        self._pending_counts: tuple[torch.Tensor, Any] | None = None  # a non-blocking copy of _counts
        self._features: dict[str, torch.Tensor] = {}  # captured since the last observe
        self._head_ever_checked = False
        self._head_checked = False  # whether the head's input was checked against _features
        self._sums: torch.Tensor | None = None  # float64 [1 + C + 3M], pooled since the last step
        self._observed = 0  # observe() calls since the last step
        self._labels: torch.Tensor | None = None
        self._owner: weakref.ref | None = None
        self._hooks = [module.register_forward_hook(self._capture_hook(m)) for m, module in encoders.items()]
        if check_head:
            self._hooks += self._head_check_hooks()
        if labels_from is not None:
            if not isinstance(labels_from, nn.Module):
                raise TypeError(f"labels_from must be an nn.Module, got {type(labels_from).__name__}")
            self._hooks.append(labels_from.register_forward_pre_hook(self._labels_hook, with_kwargs=True))
            self._hooks.append(labels_from.register_forward_hook(self._observe_hook))

    # ------------------------------------------------------------------ capture
    def _check_head(self, head: object, fusion: object) -> dict[str, nn.Module] | None:
        """Per-modality heads (sum fusion), or None (a concat head, or ``fusion``)."""
        if fusion is not None:
            if head is not None:
                raise ValueError("pass either head or fusion=callable, not both")
            if not callable(fusion):
                raise TypeError(f"fusion must be callable, got {type(fusion).__name__}")
            return None
        from .nn import AuxiliaryHeads  # fastmask.nn imports the optimizers, which import this module

        if isinstance(head, AuxiliaryHeads):
            head = head.heads
        if isinstance(head, (Mapping, nn.ModuleDict)):
            if set(head) != set(self.modalities):
                raise ValueError(f"head has heads for {sorted(head)}; the encoders are {sorted(self.modalities)}")
            for m, h in head.items():
                if not isinstance(h, nn.Module):
                    raise TypeError(f"head[{m!r}] must be an nn.Module, got {type(h).__name__}")
            return dict(head.items())
        if not isinstance(head, nn.Linear):
            raise TypeError(
                f"head must be the concat-fusion nn.Linear, a dict of per-modality heads or an AuxiliaryHeads, "
                f"got {type(head).__name__}; for another fusion pass head=None, fusion=callable"
            )
        return None

    def _capture_hook(self, modality: str) -> Callable:
        pool = self._pool.get(modality)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not _captures(module):
                return
            if pool is not None:
                output = pool(output)
            if not isinstance(output, torch.Tensor) or output.dim() != 2:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(
                    f"Balancer: the encoder of {modality!r} returned {shape}; it must return the feature vector "
                    f"[batch, dim]: pool inside the encoder (e.g. mean over time or space, or take the [CLS] "
                    f"token), pass the module that does, or give Balancer(pool={{{modality!r}: callable}})"
                )
            if modality in self._features:
                raise RuntimeError(
                    f"Balancer: the encoder of {modality!r} ran a second training forward pass before "
                    f"observe(labels) paired the first one with its labels. Call balancer.observe(labels) after "
                    f"each training forward (micro-batches of gradient accumulation are pooled that way), and "
                    f"run extra passes (metrics, logging) under torch.no_grad() or in eval mode"
                )
            if not self._features:
                self._head_checked = False
            self._features[modality] = output.detach()

        return hook

    def _head_check_hooks(self) -> list[Any]:
        """Forward pre-hooks that check the head's input against the captured features."""
        if self._fusion is not None:
            return []  # an arbitrary callable: nothing to hook
        if self._heads is None:
            return [self._head.register_forward_pre_hook(self._check_concat_input)]
        return [head.register_forward_pre_hook(self._per_modality_check(m)) for m, head in self._heads.items()]

    def _head_input(self, module: nn.Module, args: Any) -> torch.Tensor | None:
        """The head's input to check, or None when this call is not one to check."""
        if not _captures(module) or not self._features or self._head_checked:
            return None  # not a training forward, nothing captured, or a later head call in this forward
        missing = [m for m in self.modalities if m not in self._features]
        if missing:
            raise RuntimeError(
                f"Balancer: the head ran, but the encoder of {', '.join(map(repr, missing))} did not run in this "
                f"training forward (the captured modalities: {list(self._features)})"
            )
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Balancer: the head receives {shape}; the balancer's features are [batch, dim]")
        return x

    def _check_concat_input(self, module: nn.Module, args: Any) -> None:
        x = self._head_input(module, args)
        if x is None:
            return
        widths = {m: self._features[m].shape[1] for m in self.modalities}
        if x.shape[1] != sum(widths.values()) or x.shape[0] != self._features[self.modalities[0]].shape[0]:
            raise ValueError(
                f"Balancer: the head receives {tuple(x.shape)}, but the captured features {widths} concatenate to "
                f"({self._features[self.modalities[0]].shape[0]}, {sum(widths.values())}): a modality is missing "
                f"or extra, or an encoder's output is not what the head receives"
            )
        slices, start = {}, 0
        for m in self.modalities:
            slices[m] = x[:, start:start + widths[m]]
            start += widths[m]
        self._check_equal(slices, "the head's input columns of")
        self._head_checked = True

    def _per_modality_check(self, modality: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            x = self._head_input(module, args)
            if x is not None:
                self._check_equal({modality: x}, "the input of the head of")
                if modality == self.modalities[-1]:
                    self._head_checked = True

        return hook

    def _check_equal(self, seen: dict[str, torch.Tensor], what: str) -> None:
        """Raise unless ``seen[m]`` equals the captured features of each m (NaN equal to NaN).

        On the CPU the comparison is read at once. On an accelerator it is a device-side assert,
        except for the first check of this balancer, which reads it to give the full message."""
        same = {m: _same(x, self._features[m]) for m, x in seen.items()}
        on_host = next(iter(seen.values())).device.type == "cpu" or not self._head_ever_checked
        if torch.compiler.is_compiling() or not on_host:
            for m, ok in same.items():
                torch._assert_async(ok, f"Balancer: {what} {m!r} differ from its encoder's output")
            return
        self._head_ever_checked = True
        wrong = [m for m, ok in same.items() if not bool(ok)]
        if not wrong:
            return
        if len(seen) > 1:  # a concat head: which modality's features does each slice hold?
            holds = {m: [n for n in self.modalities if self._features[n].shape == x.shape and bool(
                _same(x, self._features[n]))] for m, x in seen.items()}
            if all(len(v) == 1 for v in holds.values()) and sorted(v[0] for v in holds.values()) == sorted(seen):
                order = [holds[m][0] for m in self.modalities]
                raise ValueError(
                    f"Balancer: the head concatenates the features in the order {order}, but the encoders are "
                    f"listed as {list(self.modalities)}: list them in the head's order, "
                    f"Balancer({{{', '.join(f'{m!r}: ...' for m in order)}}}, head)"
                )
        raise ValueError(
            f"Balancer: {what} {', '.join(map(repr, wrong))} differ from what its encoder returned (after pool=). "
            f"The balancer computes uni-modal logits from the captured features, so they must be what the head "
            f"receives: check the encoders' order and pool= (e.g. mean-pooling while the head takes the [CLS] "
            f"token), hook the module whose output the head receives, or pass check_head=False when a module "
            f"in between (dropout, OPM) changes the features on purpose"
        )

    def _labels_hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self._labels = kwargs.get("labels") if module.training else None

    def _observe_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        labels, self._labels = self._labels, None
        if module.training and labels is not None:
            self.observe(labels)

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def observe(self, labels: torch.Tensor) -> None:
        """Pool the last training-mode forward pass with its ``labels`` (int [batch]).

        Raises, before anything is pooled, if an encoder did not run since the last call,
        or if the labels do not fit the features and logits.
        """
        missing = [m for m in self.modalities if m not in self._features]
        if missing:
            raise RuntimeError(
                f"Balancer.observe: the encoder of {', '.join(map(repr, missing))} did not run in training mode "
                f"since the last observe (the model must be in train() and run every encoder)"
            )
        features = {m: self._features[m] for m in self.modalities}
        batch = next(iter(features.values())).shape[0]
        for m, z in features.items():
            if z.shape[0] != batch:
                raise ValueError(f"Balancer: the features of {m!r} have batch {z.shape[0]}, others have {batch}")
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.int16,
                                                                          torch.uint8):
            raise TypeError(f"labels must be an integer tensor [batch], got "
                            f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},) (the features' batch), got {tuple(labels.shape)}")
        logits = self._unimodal_logits(features)
        n_classes = logits[self.modalities[0]].shape[1]
        device = logits[self.modalities[0]].device
        labels = labels.to(device=device, dtype=torch.int64)
        if labels.device.type == "cpu":
            if batch and bool(((labels < 0) | (labels >= n_classes)).any()):
                raise ValueError(f"labels must be in [0, {n_classes}) (the head's classes); got values outside")
        else:  # checked on the device, without a synchronisation
            torch._assert_async(((labels >= 0) & (labels < n_classes)).all(), "labels out of the head's classes")
        width = 1 + n_classes + PER_MODALITY * len(self.modalities)
        if self._sums is None or self._sums.device != device:
            self._sums = torch.zeros(width, dtype=torch.float64, device=device)
            self._move_state(device)
        elif self._sums.numel() != width:
            raise ValueError(f"Balancer: the head now has {n_classes} classes, it had "
                             f"{self._sums.numel() - 1 - PER_MODALITY * len(self.modalities)}")
        per_modality = []
        for m in self.modalities:
            out = logits[m].double()
            log_probs = F.log_softmax(out, dim=1)
            z = features[m].double()
            feature_entropy = -(F.softmax(z, dim=1) * F.log_softmax(z, dim=1)).sum(dim=1)
            true_log_prob = log_probs.gather(1, labels[:, None]).squeeze(1)
            correct = (out.argmax(dim=1) == labels).sum().double()
            per_modality.append(torch.stack((true_log_prob.sum(), feature_entropy.sum(), true_log_prob.exp().sum(),
                                             correct)))
        per_modality = torch.stack(per_modality)  # [M, 3]
        finite = torch.isfinite(per_modality).all(dim=1)  # [M]
        good = finite.all()
        row = torch.cat([torch.full((1,), float(batch), dtype=torch.float64, device=device),
                         torch.bincount(labels, minlength=n_classes).to(torch.float64)[:n_classes],
                         per_modality.reshape(-1)])
        # a batch with a non-finite statistic is dropped whole, on the device (no synchronisation)
        self._sums += torch.where(good, row, 0.0)
        self._counts[:-2] += (~finite).double()
        self._counts[-2] += (~good).double()
        self._features.clear()
        self._observed += 1
        self._poll_counts()

    def _unimodal_logits(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._fusion is not None:
            return {m: self._fusion({n: z if n == m else torch.zeros_like(z) for n, z in features.items()})
                    for m in self.modalities}
        if self._heads is not None:
            return {m: self._heads[m](features[m].to(_dtype(self._heads[m]))) for m in self.modalities}
        head = self._head
        widths = [features[m].shape[1] for m in self.modalities]
        if sum(widths) != head.in_features:
            raise ValueError(
                f"Balancer: the feature widths {dict(zip(self.modalities, widths))} sum to {sum(widths)}, but the "
                f"head takes {head.in_features} inputs; the encoders must be listed in the head's concatenation "
                f"order and produce exactly its input"
            )
        return significance._concat_logits(head, features, self.modalities)

    # ------------------------------------------------------------------ values
    def _move_state(self, device: torch.device) -> None:
        """Keep the counters and values on the statistics' device."""
        self._steps = self._steps.to(device)
        self._counts = self._counts.to(device)
        self._smoothed = {k: v.to(device) for k, v in self._smoothed.items()}
        self._last = {k: v.to(device) for k, v in self._last.items()}

    def _poll_counts(self) -> None:
        """Warn once when a batch was dropped or a step fell back, without waiting for the
        device: the counters are copied without blocking and read once the copy is done."""
        if self._warned:
            return
        if self._pending_counts is not None:
            host, done = self._pending_counts
            if done is not None and not done.query():
                return
            self._pending_counts = None
            self._warn_once(host)
        if self._counts.device.type == "cpu":
            self._warn_once(self._counts)
        elif self._counts.device.type == "cuda":
            host = torch.empty(self._counts.shape, dtype=self._counts.dtype, pin_memory=True)
            host.copy_(self._counts, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending_counts = (host, done)

    def _warn_once(self, counts: torch.Tensor) -> None:
        counts = counts.tolist()
        per_modality, dropped, fallback_steps = counts[:-2], counts[-2], counts[-1]
        if not (dropped or fallback_steps):
            return
        self._warned = True
        if dropped:
            bad = [m for m, n in zip(self.modalities, per_modality) if n]
            why = (f"a batch's statistics of {', '.join(map(repr, bad))} are not finite (a NaN or inf in its "
                   f"features or the head's logits, e.g. from a non-finite input); the batch was dropped")
        else:
            why = "a step's values were not finite (e.g. a modality whose features have zero entropy)"
        warnings.warn(f"Balancer: {why}, and the step used the last good values (the rule's fallback before any); "
                      f"the step count and smoothed values did not change. Further cases are counted in "
                      f"balancer.stats() without a warning.", RuntimeWarning, stacklevel=3)

    def _pooled_sums(self) -> torch.Tensor:
        """This step's pooled statistics (summed over ranks); the pool itself is left as it is."""
        if self._observed == 0:
            if self._features:
                raise RuntimeError(
                    "Balancer: features were captured but no labels were seen since the last step: call "
                    "balancer.observe(labels) after the forward pass, or build the Balancer with labels_from=model"
                )
            raise RuntimeError(
                "Balancer: nothing observed since the last step: no training-mode forward pass with labels ran "
                "(call balancer.observe(labels) after each forward pass, or pass labels_from=model)"
            )
        sums = self._sums.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums, group=self.process_group)
        return sums

    @torch.no_grad()
    def prepare(self, kind: str) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
        """This step's values (as ``take``) and a function that commits them: until it is
        called, nothing in the balancer changes (the optimizer commits after its step ran, so
        that a step that raises leaves the balancer as it was)."""
        check_choice("kind", kind, ("ratios", "coefficients"))
        sums = self._pooled_sums()
        mir = self._mutual_information_rates(sums)  # the ratios' rule and the trace both read it
        new = self._ratios_from_rates(mir) if kind == "ratios" else self._coefficients(sums)
        ok = (sums[0] > 0) & torch.isfinite(new).all()
        in_window = self._steps >= self.start
        if self.end is not None:
            in_window &= self._steps < self.end
        previous = self._smoothed.get(kind)
        if self.smoothing and previous is not None:
            blended = torch.where(torch.isnan(previous), new,
                                  self.smoothing * previous + (1.0 - self.smoothing) * new)
        else:
            blended = new
        fallback = self.fallback if kind == "ratios" else 1.0
        last = self._last.get(kind, torch.full_like(new, fallback))
        good = ok & in_window
        values = torch.where(in_window, torch.where(ok, blended, last), torch.ones_like(new))
        count, _, per = self._split(sums)
        measured = torch.stack((per[:, CORRECT] / count, per[:, TRUE_PROB] / count,
                                mir, values), 1)  # [M, 4]: the trace's row
        smoothed = torch.where(good, blended, previous if previous is not None else torch.full_like(new, math.nan))
        new_last = torch.where(good, blended, last)

        def commit() -> None:
            self._sums.zero_()
            self._observed = 0
            self._smoothed[kind] = smoothed
            self._last[kind] = new_last
            self._steps = self._steps + ok.to(torch.int64)  # on the statistics' device since observe()
            self._counts[-1] += (~ok).double()
            self._trace.record(kind, measured, ok & torch.isfinite(measured).all())
            self._poll_counts()

        out = values.to(torch.float32)
        return {m: out[i] for i, m in enumerate(self.modalities)}, commit

    def take(self, kind: str) -> dict[str, torch.Tensor]:
        """This step's values, as 0-d fp32 tensors on the statistics' device: ``"ratios"``
        (AMSS) or ``"coefficients"`` (OGM); pools are reset. Called by the attached optimizer's
        ``step()`` once per step; raises if nothing was observed since the previous one."""
        values, commit = self.prepare(kind)
        commit()
        return values

    @property
    def steps(self) -> int:
        """Steps that took values from good statistics (the window's t). Reading it synchronises."""
        return int(self._steps)

    def stats(self) -> dict[str, Any]:
        """Counters since construction (reading them synchronises): ``steps``, ``dropped_batches``
        (batches with a non-finite statistic), ``non_finite`` (modality -> batches in which its
        statistics were not finite), ``fallback_steps`` (steps that handed out the last good values)."""
        counts = self._counts.tolist()
        return {"steps": self.steps, "dropped_batches": int(counts[-2]),
                "non_finite": {m: int(n) for m, n in zip(self.modalities, counts[:-2])},
                "fallback_steps": int(counts[-1])}

    def history(self, modality: str | None = None) -> dict[str, Any]:
        """What this balancer measured and handed out, step by step (reading it synchronises).

        Returns ``{"step": [first step of each bucket], "good_steps": [steps with good
        statistics in it], "value": "ratio" or "coefficient", modality: {"accuracy",
        "true_class_prob", "mi_rate", value: [bucket means]}}``, or with ``modality`` only that
        modality's dict. ``accuracy`` is the head slice's (the uni-modal logits'), ``mi_rate``
        the mutual-information rate the AMSS ratios come from, the value what the optimizer was
        handed. A bucket holds ``history_size``-bounded spans of steps (see ``__init__``); a
        bucket without a good step is NaN. ``fastmask.plot_balance`` draws it. Not checkpointed:
        it is a diagnostic of this process's run.
        """
        if modality is not None and modality not in self.modalities:
            raise ValueError(f"history: modality {modality!r} is not measured by this balancer (its encoders: "
                             f"{list(self.modalities)})")
        out = self._trace.history()
        return out if modality is None else out[modality]

    def _split(self, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n_classes = sums.numel() - 1 - PER_MODALITY * len(self.modalities)
        per = sums[1 + n_classes:].reshape(len(self.modalities), PER_MODALITY)
        return sums[0], sums[1:1 + n_classes], per

    def _mutual_information_rates(self, sums: torch.Tensor) -> torch.Tensor:
        """MIR_m = (H(Y) + mean log q(y|x_m)) / mean H(softmax(z_m)) (float64 [M]) from pooled sums."""
        count, label_counts, per = self._split(sums)
        h_y = significance._label_entropy(label_counts / count)
        return (h_y + per[:, LOG_Q] / count) / (per[:, FEATURE_ENTROPY] / count)

    def _ratios(self, sums: torch.Tensor) -> torch.Tensor:
        """The AMSS ratios (float64 [M]) from pooled sums."""
        return self._ratios_from_rates(self._mutual_information_rates(sums))

    def _ratios_from_rates(self, mir: torch.Tensor) -> torch.Tensor:
        rho = significance._ratios_from_rates(mir, self.temperature, self.bounds, self.bias)
        return torch.where(torch.isfinite(mir).all(), rho, math.nan)  # not finite: prepare() falls back

    def _discrepancy(self, sums: torch.Tensor) -> torch.Tensor:
        """The OGM discrepancy ratio rho_m (float64 [M]) from pooled sums."""
        _, _, per = self._split(sums)
        return significance._discrepancy_from_scores(per[:, TRUE_PROB].clamp_min(1e-300), self.rule)

    def _coefficients(self, sums: torch.Tensor) -> torch.Tensor:
        return significance._coefficients_from_discrepancy(self._discrepancy(sums), self.alpha, self.form)

    # ------------------------------------------------------------------ lifecycle
    def attach(self, optimizer: object) -> None:
        """Called by an optimizer built with ``balancer=``: one balancer serves one optimizer."""
        owner = self._owner() if self._owner is not None else None
        if owner is not None and owner is not optimizer:
            raise ValueError("this Balancer is already attached to another optimizer; build one Balancer per optimizer")
        self._owner = weakref.ref(optimizer)

    def state_dict(self) -> dict[str, Any]:
        """The step counter (the window's t), the smoothed values and the last good values
        (reading them synchronises)."""
        smoothed = {k: v.cpu() for k, v in self._smoothed.items() if not bool(torch.isnan(v).all())}
        return {"steps": self.steps, "smoothed": smoothed, "last": {k: v.cpu() for k, v in self._last.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s values (validated first: nothing changes on an error)."""
        self._apply(self.validated_state(state))

    def validated_state(self, state: object) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(steps, smoothed values, last good values) of a ``state_dict()``, checked; raises
        ValueError. A state without ``"last"`` (written before it existed) has none."""
        if not isinstance(state, Mapping) or not {"steps", "smoothed"} <= set(state) <= {"steps", "smoothed", "last"}:
            raise ValueError("a Balancer state must be a mapping with keys 'steps', 'smoothed' and 'last'")
        steps = check_int("balancer state['steps']", state["steps"], 0, 2**62)
        values = []
        for key in ("smoothed", "last"):
            entry = state.get(key, {})
            if not isinstance(entry, Mapping):
                raise ValueError(f"balancer state[{key!r}] must be a mapping")
            for kind, value in entry.items():
                if kind not in ("ratios", "coefficients") or not isinstance(value, torch.Tensor) or tuple(
                        value.shape) != (len(self.modalities),) or not bool(torch.isfinite(value).all()):
                    raise ValueError(f"balancer state[{key!r}][{kind!r}] must be a tensor of "
                                     f"{len(self.modalities)} finite values")
            values.append({k: v.detach().clone().double() for k, v in entry.items()})
        return steps, values[0], values[1]

    def _apply(self, validated: tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]) -> None:
        steps, self._smoothed, self._last = validated
        self._steps = torch.tensor(steps, dtype=torch.int64)
        self._move_state(self._sums.device if self._sums is not None else torch.device("cpu"))

    def remove(self) -> None:
        """Remove the forward hooks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def _captures(module: nn.Module) -> bool:
    """Whether a call of ``module`` is a training forward the balancer measures: training mode,
    gradients enabled (not a no_grad / inference_mode pass), not a recomputation in backward."""
    return module.training and torch.is_grad_enabled() and torch._C._current_autograd_node() is None


def _same(x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: ``x`` equals ``features`` (in ``x``'s dtype), NaN equal to NaN."""
    z = features.to(x.dtype)
    return ((x == z) | (torch.isnan(x) & torch.isnan(z))).all()


def _dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def modality_groups(
    model: nn.Module,
    prefixes: Mapping[str, str | Sequence[str]],
    *,
    named: bool = False,
    **options: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Param groups from module-name prefixes: ``{"audio": "audio_net", "visual": ["visual_net",
    "visual_proj"]}`` puts every parameter whose name starts with one of a modality's prefixes
    (as a whole name component: "audio_net" matches "audio_net.conv.weight", not
    "audio_net2.weight") in that modality's group; everything unmatched forms one dense group
    (no modality), omitted when empty. Frozen parameters (``requires_grad=False``) are left out.

    ``named=True`` lists ``(name, param)`` pairs, as ``model.named_parameters()`` does, so that the
    optimizer keeps each group's ``param_names`` (torch.optim's named parameters).

    ``options``: extra keys per group, by modality name or ``"dense"``, e.g.
    ``dense={"weight_decay": 0.0}``. A parameter matched by two modalities, or a prefix that
    matches nothing, is an error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(named, bool):
        raise TypeError(f"named must be a bool, got {type(named).__name__}")
    if not isinstance(prefixes, Mapping) or not prefixes:
        raise TypeError("prefixes must be a non-empty dict of modality -> prefix or list of prefixes")
    table: dict[str, list[str]] = {}
    for m, value in prefixes.items():
        names = [value] if isinstance(value, str) else list(value) if isinstance(value, Iterable) else None
        if not names or not all(isinstance(n, str) and n for n in names):
            raise TypeError(f"prefixes[{m!r}] must be a module name or a list of them, got {value!r}")
        table[m] = [n.rstrip(".") for n in names]
    for key in options:
        if key != "dense" and key not in table:
            raise ValueError(f"options for {key!r}: not a modality of prefixes ({sorted(table)}) nor 'dense'")
        if not isinstance(options[key], Mapping):
            raise TypeError(f"options[{key!r}] must be a dict of group keys")
    groups: dict[str, list[Any]] = {m: [] for m in table}
    dense: list[Any] = []
    used = {(m, prefix): False for m, names in table.items() for prefix in names}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owners = [(m, prefix) for m, names in table.items() for prefix in names
                  if name == prefix or name.startswith(prefix + ".")]
        if len({m for m, _ in owners}) > 1:
            raise ValueError(f"parameter {name!r} matches the prefixes of {sorted({m for m, _ in owners})}; "
                             f"each parameter belongs to one modality")
        for key in owners:
            used[key] = True
        (groups[owners[0][0]] if owners else dense).append((name, p) if named else p)
    unused = [f"{m}: {prefix!r}" for (m, prefix), hit in used.items() if not hit]
    if unused:
        raise ValueError(f"these prefixes match no trainable parameter of the model: {', '.join(unused)}")
    out = [{"params": params, "modality": m, **options.get(m, {})} for m, params in groups.items()]
    if dense:
        out.append({"params": dense, **options.get("dense", {})})
    return out
