"""The reference fused step: DESIGN §3 for one batch of tensors, in plain PyTorch.

Every intermediate is fp32; params may be fp32/bf16/fp16 and are written back in
their own dtype. Nothing here synchronises with the host: the non-finite skip,
``found_inf`` and the first-step momentum rule are all ``torch.where`` on device.
"""

from __future__ import annotations

import torch

from . import sampling
from .philox import STREAM_MASK, STREAM_NOISE, normal, rng_stream
from .spec import SUM_COLS, StepConfig, TensorBatch, check_shardable, exact_count


def power(base: float, exponent: torch.Tensor) -> torch.Tensor:
    """base ** exponent in fp64 by binary exponentiation (integer exponents < 2^32).

    The kernels compute beta^t the same way, so bias corrections agree to the last bit.
    """
    e = exponent.to(torch.int64)
    result = torch.ones(e.shape, dtype=torch.float64, device=e.device)
    square = float(base)
    for bit in range(32):
        result = torch.where(((e >> bit) & 1) == 1, result * square, result)
        square = square * square
    return result


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded fp32 square root (torch's CPU sqrt is not; an fp64 sqrt
    rounded once to fp32 is, and it is what the kernels' IEEE sqrt returns)."""
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def adam_corrections(steps: torch.Tensor, cfg: StepConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tensor (fp32): step_size = lr / (1 - beta1^t) and sqrt(1 - beta2^t), from fp64."""
    step_size = (cfg.lr / (1.0 - power(cfg.beta1, steps))).to(torch.float32)
    bias_correction2_sqrt = torch.sqrt(1.0 - power(cfg.beta2, steps)).to(torch.float32)
    return step_size, bias_correction2_sqrt


def base_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    step: torch.Tensor,
    cfg: StepConfig,
    exp_avg: torch.Tensor | None,
    exp_avg_sq: torch.Tensor | None,
    momentum_buffer: torch.Tensor | None,
    corrections: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One dense step of the base optimizer, the math of torch's single-tensor optimizers.

    All arguments are fp32; ``step`` is the step count after this step and
    ``corrections`` the Adam scalars of ``adam_corrections`` for it. Every operation
    is one IEEE-rounded fp32 op (no fused multiply-add, unlike torch.lerp on CPU), so
    a kernel can reproduce it bit for bit. Returns the new (param, exp_avg, exp_avg_sq,
    momentum_buffer), out of place.
    """
    lr = cfg.lr
    if cfg.base == "sgd":
        d_p = grad + cfg.weight_decay * param if cfg.weight_decay else grad
        if cfg.momentum:
            # torch starts the buffer as a copy of d_p; later steps decay it.
            running = momentum_buffer * cfg.momentum + d_p * (1.0 - cfg.dampening)
            momentum_buffer = torch.where(step == 1, d_p, running)
            d_p = d_p + cfg.momentum * momentum_buffer if cfg.nesterov else momentum_buffer
        return param - lr * d_p, exp_avg, exp_avg_sq, momentum_buffer

    if cfg.weight_decay:
        if cfg.base == "adamw":
            param = param * (1.0 - lr * cfg.weight_decay)
        else:
            grad = grad + cfg.weight_decay * param
    exp_avg = exp_avg + (grad - exp_avg) * (1.0 - cfg.beta1)
    exp_avg_sq = exp_avg_sq * cfg.beta2 + grad * grad * (1.0 - cfg.beta2)
    step_size, bias_correction2_sqrt = corrections if corrections is not None else adam_corrections(step, cfg)
    denom = sqrt_rn(exp_avg_sq) / bias_correction2_sqrt + cfg.eps
    return param - step_size * (exp_avg / denom), exp_avg, exp_avg_sq, momentum_buffer


def ge_noise(
    grad32: torch.Tensor, seed: int, stream: int | torch.Tensor, sum_g: torch.Tensor, sum_g2: torch.Tensor,
    numel: int, start: int = 0,
) -> torch.Tensor:
    """OGM-GE noise N(0, std(g)^2) per element. std is the full tensor's, unbiased, from its
    fp64 sums of g and g^2 (0 for one element); ``start`` is the shard's first element."""
    var = (sum_g2 - sum_g * sum_g / numel).clamp(min=0.0) / max(numel - 1, 1)
    std = torch.sqrt(var).to(torch.float32) if numel > 1 else grad32.new_zeros(())
    return normal(seed, stream, grad32.numel(), grad32.device, start=start).reshape(grad32.shape) * std


def _get(values: list[torch.Tensor], i: int) -> torch.Tensor | None:
    return values[i] if values else None


def _unscaled(grad: torch.Tensor, cfg: StepConfig, grad_scale: torch.Tensor | None) -> torch.Tensor:
    g = grad.to(torch.float32)
    if grad_scale is not None:
        g = g / grad_scale
    return -g if cfg.maximize else g


def _importance_units(
    g: torch.Tensor, fisher: torch.Tensor | None, cfg: StepConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(s_u per local unit, the updated EMA F' or None)."""
    new_fisher = sampling.fisher_update(fisher, g, cfg.fisher_beta) if fisher is not None else None
    importance = new_fisher if new_fisher is not None else g * g
    return sampling.unit_sums(importance, cfg.granularity), new_fisher


def masked_step_sums(
    batch: TensorBatch, cfg: StepConfig, grad_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 (DESIGN §5): per tensor, float64 [T, cfg.sums_width] = sum of s_u, sum g, sum g^2,
    non-finite count, then with water-filling the histogram of s_u (``sampling.unit_histogram``);
    and for row granularity each row's importance s_u, fp32 [units of every tensor, in
    order] (element granularity: empty). A sharded batch all-reduces the sums before
    ``masked_step_finish``.

    The reference's finish recomputes g and s per tensor rather than keeping every tensor's
    intermediates alive until the all-reduce: it trades time for memory."""
    rows, units = [], []
    for i in range(len(batch)):
        g = _unscaled(batch.grads[i], cfg, grad_scale)
        s_units, _ = _importance_units(g, _get(batch.fishers, i), cfg)
        g64 = g.to(torch.float64)
        nonfinite = (~torch.isfinite(g)).sum(dtype=torch.float64)
        row = torch.stack((s_units.sum(dtype=torch.float64), g64.sum(), (g64 * g64).sum(), nonfinite))
        rows.append(torch.cat((row, sampling.unit_histogram(s_units))) if cfg.water_filling else row)
        if cfg.row:
            units.append(s_units.to(torch.float32))
    importance = torch.cat(units) if units else batch.params[0].new_empty(0, dtype=torch.float32)
    return torch.stack(rows), importance


def masked_step_finish(
    batch: TensorBatch,
    cfg: StepConfig,
    sums: torch.Tensor,
    unit_importance: torch.Tensor,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """The rest of the step from pass 1's ``sums`` (for shards, their totals over the shards);
    ``unit_importance`` is not read here (the reference recomputes s)."""
    check_shardable(batch, cfg)
    new_steps = torch.stack(batch.steps) + 1
    corrections = adam_corrections(new_steps, cfg) if cfg.base != "sgd" else None
    levels = sampling.water_level(sums[:, SUM_COLS:], cfg.ratio, cfg.min_prob) if cfg.water_filling else None
    for i in range(len(batch)):
        _step_tensor(
            batch, i, sums[i], cfg, grad_scale, found_inf, new_steps[i],
            (corrections[0][i], corrections[1][i]) if corrections is not None else None,
            levels[i] if levels is not None else None,
        )


def masked_step_(
    batch: TensorBatch,
    cfg: StepConfig,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """Apply one masked (AMSS/AMSS+) or modulated (OGM) step to every tensor of ``batch``."""
    if not batch.params:
        return
    check_shardable(batch, cfg)
    sums, unit_importance = masked_step_sums(batch, cfg, grad_scale)
    masked_step_finish(batch, cfg, sums, unit_importance, grad_scale, found_inf)


def _step_tensor(
    batch: TensorBatch,
    i: int,
    sums: torch.Tensor,
    cfg: StepConfig,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    new_step: torch.Tensor,
    corrections: tuple[torch.Tensor, torch.Tensor] | None,
    level: torch.Tensor | None,
) -> None:
    param, step, slot, stats = batch.params[i], batch.steps[i], batch.slots[i], batch.stats
    exp_avg, exp_avg_sq = _get(batch.exp_avgs, i), _get(batch.exp_avg_sqs, i)
    momentum_buffer, fisher = _get(batch.momentum_buffers, i), _get(batch.fishers, i)
    space = batch.index_space(i, cfg.granularity)

    g = _unscaled(batch.grads[i], cfg, grad_scale)
    finite = sums[3] == 0
    ok = finite if found_inf is None else finite & (found_inf == 0)

    # OGM: scale the gradient (modulate="grad"), then add GE noise with the unmodulated std.
    grad_coefficient = cfg.grad_coefficient
    if isinstance(grad_coefficient, torch.Tensor):  # read on the device: g * 1 is g exactly
        g_mod = g * grad_coefficient.to(torch.float32).reshape(())
    else:
        g_mod = g * grad_coefficient if grad_coefficient != 1.0 else g
    if cfg.ge_noise:
        stream = rng_stream(new_step, slot, STREAM_NOISE)
        g_mod = g_mod + ge_noise(g, cfg.seed, stream, sums[1], sums[2], space.numel, space.first_element)

    s_units, new_fisher = _importance_units(g, fisher, cfg)
    selected = None  # None: every element takes the base update
    if cfg.is_masked:
        stream = rng_stream(new_step, slot, STREAM_MASK)
        total = sums[0].to(torch.float32)
        if cfg.sampling == "exact":  # the count is chosen on the host: a ratio tensor is read here
            ratio = float(cfg.ratio)
            sel_units = sampling.exact_select_ratio(s_units, ratio, cfg.seed, stream)
            pi = None
            expected = float(exact_count(ratio, s_units.numel()))
        else:
            pi = sampling.inclusion_probs_units(s_units, cfg.ratio, cfg.sampling, cfg.min_prob, level, total)
            sel_units = sampling.bernoulli_select(pi, cfg.seed, stream, start=space.first_unit)
            expected = pi.sum(dtype=torch.float64)
        weights = sampling.rescale_weights(s_units, pi, cfg.unbiased, cfg.rescale, total, space.units)
        if weights is not None and isinstance(cfg.ratio, torch.Tensor):  # ratio 1: the base optimizer
            weights = torch.where(cfg.ratio.to(torch.float32).reshape(()) >= 1.0, 1.0, weights)
        selected = sampling.expand_units(sel_units, g.shape, cfg.granularity)
        if weights is not None:
            g_mod = g_mod * sampling.expand_units(weights, g.shape, cfg.granularity)
        g_mod = torch.where(selected, g_mod, torch.zeros((), device=g.device))
        if cfg.masked == "zero_grad":
            selected = None
        n_units, n_selected = s_units.numel(), sel_units.sum(dtype=torch.float64)
    else:
        n_units = sampling.unit_count(g.shape, cfg.granularity)
        expected = n_selected = float(n_units)
    if stats is not None:
        zero = torch.zeros((), dtype=torch.float64, device=g.device)
        # where, not a product: a skipped tensor's expected count may be NaN
        stats[0] += torch.where(ok, expected, zero)
        stats[1] += torch.where(ok, n_selected, zero)
        stats[2] += torch.where(ok, float(n_units), zero)
    if stats is not None and found_inf is not None:
        stats[3] += (~finite & (found_inf == 0)).to(torch.float64)
    elif stats is not None:
        stats[3] += (~finite).to(torch.float64)

    p32 = param.to(torch.float32)
    new_p, new_m, new_v, new_buf = base_update(
        p32, g_mod, new_step, cfg, exp_avg, exp_avg_sq, momentum_buffer, corrections
    )
    if cfg.modulate_update and isinstance(cfg.coefficient, torch.Tensor):
        k = cfg.coefficient.to(torch.float32).reshape(())
        new_p = torch.where(k != 1.0, p32 + (new_p - p32) * k, new_p)
    elif cfg.modulate_update:
        new_p = p32 + (new_p - p32) * cfg.coefficient

    update = ok if selected is None else selected & ok
    param.copy_(torch.where(update, new_p, p32))
    for old, new in ((exp_avg, new_m), (exp_avg_sq, new_v), (momentum_buffer, new_buf)):
        if old is not None:
            old.copy_(torch.where(update, new, old))
    if fisher is not None:
        fisher.copy_(torch.where(ok, new_fisher, fisher))
    step.copy_(torch.where(ok, new_step, step))
