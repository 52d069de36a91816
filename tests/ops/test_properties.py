"""Hypothesis property tests of the ops (shapes, dtypes, ratios, seeds, granularities)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmask import ops

shapes = st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
ratios = st.floats(0.01, 1.0)
granularities = st.sampled_from(["element", "row"])
seeds = st.integers(0, 2**64 - 1)


def _importance(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed % 2**63)
    return (torch.randn(shape, generator=gen) ** 2).to(dtype)


@settings(max_examples=60, deadline=None)
@given(shapes, dtypes, ratios, granularities, seeds)
def test_probs_in_unit_interval_and_sum_k(shape, dtype, ratio, granularity, seed):
    s = _importance(shape, dtype, seed)
    pi = ops.inclusion_probs(s, ratio, granularity=granularity)
    assert pi.shape == s.shape and pi.dtype == torch.float32
    assert ((pi >= 0) & (pi <= 1)).all()
    units = pi.reshape(pi.shape[0], -1)[:, 0] if granularity == "row" and pi.dim() else pi.reshape(-1)
    # water-filling: the expected count is k whether or not caps bind (their excess goes to the others)
    k = torch.tensor(ratio, dtype=torch.float32).item() * units.numel()
    assert abs(units.double().sum().item() - k) <= 1e-5 * units.numel() + 1e-6


@settings(max_examples=60, deadline=None)
@given(shapes, ratios, granularities, seeds, st.integers(0, 2**40))
def test_mask_only_where_pi_positive(shape, ratio, granularity, seed, stream):
    s = _importance(shape, torch.float32, seed)
    s[s < 0.5] = 0  # some zero-importance units
    pi = ops.inclusion_probs(s, ratio, granularity=granularity)
    mask = ops.sample_mask(pi, seed=seed, stream=stream, granularity=granularity)
    assert mask.shape == s.shape
    assert not (mask & (pi == 0)).any()
    assert mask[pi == 1].all()
    out = ops.unbiased_rescale(s, mask, pi)
    assert torch.isfinite(out).all() and (out[~mask] == 0).all()


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 50), granularities, seeds)
def test_exact_selects_k_units(shape, k, granularity, seed):
    s = _importance(shape, torch.float32, seed)
    n = (shape[0] if shape else 1) if granularity == "row" else s.numel()
    k = min(k, n)
    mask = ops.sample_exact(s, k, seed=seed, granularity=granularity)
    units = mask.reshape(mask.shape[0], -1)[:, 0] if granularity == "row" and mask.dim() and mask.numel() else mask.reshape(-1)
    assert units.sum().item() == k
