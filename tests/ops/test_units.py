"""Ops against their definitions, statistics of the samplers, bad input."""

import itertools

import pytest
import torch
from scipy import stats as scipy_stats

from fastmask import ops
from fastmask.reference.philox import uniform

from ..oracles import quantized, water_fill


def test_fisher_update_in_place():
    f = torch.rand(5, 3)
    g = torch.randn(5, 3, dtype=torch.bfloat16)
    expected = 0.8 * f + 0.2 * g.float() ** 2
    out = ops.fisher_update_(f, g, 0.8)
    assert out is f
    torch.testing.assert_close(f, expected, rtol=1e-6, atol=1e-7)


def test_poisson_probs_sum_to_k_without_cap():
    s = torch.rand(1000) + 0.5  # max/mean < 3: no unit reaches 1 at ratio 0.3
    pi = ops.inclusion_probs(s, 0.3)
    assert pi.max() < 1
    assert pi.sum().item() == pytest.approx(300, rel=1e-6)
    q = quantized(s)
    torch.testing.assert_close(pi, (300 * q / q.sum()).float())


def test_poisson_cap_gives_the_excess_to_the_others():
    s = torch.tensor([100.0, 1.0, 1.0, 0.0])
    pi = ops.inclusion_probs(s, 0.5, min_prob=0.05)
    # k = 2: the first unit is capped at 1, the zero unit is at min_prob, the two others share the rest
    torch.testing.assert_close(pi, torch.tensor([1.0, 0.475, 0.475, 0.05]))


@pytest.mark.parametrize("bad", [0.0, float("inf"), float("nan")])
def test_degenerate_importance_falls_back_to_ratio(bad):
    s = torch.zeros(10) if bad == 0 else torch.full((10,), bad)
    assert torch.equal(ops.inclusion_probs(s.abs(), 0.25), torch.full((10,), 0.25))


def test_uniform_and_dense():
    s = torch.rand(7, 3)
    assert torch.equal(ops.inclusion_probs(s, 0.4, sampling="uniform"), torch.full((7, 3), 0.4))
    assert torch.equal(ops.inclusion_probs(s, 1.0), torch.ones(7, 3))


def test_row_probs_broadcast_over_rows():
    s = torch.rand(6, 4, 3)
    s[0] *= 100  # one row above the level: capped, its excess shared by the others
    pi = ops.inclusion_probs(s, 0.5, granularity="row")
    rows = s.reshape(6, -1).sum(1)
    assert pi.shape == s.shape
    torch.testing.assert_close(pi[:, 0, 0], water_fill(quantized(rows), 3.0).float())
    assert pi[0, 0, 0] == 1 and pi[:, 0, 0].sum().item() == pytest.approx(3.0, rel=1e-6)
    assert torch.equal(pi, pi[:, :1, :1].expand_as(pi))


def test_sample_mask_is_u_below_pi():
    pi = torch.rand(4097)
    mask = ops.sample_mask(pi, seed=123, stream=77)
    assert torch.equal(mask, uniform(123, 77, 4097) < pi)


def test_sample_mask_rows_use_row_index():
    pi = ops.inclusion_probs(torch.rand(9, 5), 0.5, granularity="row")
    mask = ops.sample_mask(pi, seed=5, stream=2, granularity="row")
    assert torch.equal(mask[:, 0], uniform(5, 2, 9) < pi[:, 0])
    assert torch.equal(mask, mask[:, :1].expand_as(mask))


def test_sample_mask_noncontiguous_uses_logical_index():
    pi = torch.rand(8, 6).t()  # non-contiguous view
    assert torch.equal(ops.sample_mask(pi, seed=1), uniform(1, 0, 48).reshape(6, 8) < pi)


def test_selection_frequency_chi_square():
    # 3000 independent streams; a chi-square test at alpha=1e-3 on 64 units detects a
    # 10% relative bias in pi with power > 0.99 (fixed seed: the outcome is deterministic).
    pi = torch.linspace(0.05, 0.95, 64)
    draws = 3000
    counts = sum(ops.sample_mask(pi, seed=99, stream=t).double() for t in range(draws))
    p = pi.double()
    chi2 = (((counts - draws * p) ** 2) / (draws * p * (1 - p))).sum().item()
    assert scipy_stats.chi2.sf(chi2, df=64) > 1e-3


def test_unbiased_rescale_mean_is_grad():
    g = torch.randn(40)
    pi = ops.inclusion_probs(g * g, 0.3, min_prob=0.05)
    draws = 20_000
    total = torch.zeros(40, dtype=torch.float64)
    for t in range(draws):
        mask = ops.sample_mask(pi, seed=4, stream=t)
        total += ops.unbiased_rescale(g, mask, pi).double()
    mean = total / draws
    # std of the mean: |g| sqrt((1-pi)/pi / draws); 5 sigma per element
    sigma = g.abs().double() * ((1 - pi.double()) / pi.double() / draws).sqrt()
    assert ((mean - g.double()).abs() <= 5 * sigma + 1e-9).all()


def _inclusion_by_enumeration(w, k):
    n = len(w)
    pi = [0.0] * n
    for seq in itertools.permutations(range(n), k):
        prob, left = 1.0, sum(w)
        for u in seq:
            prob *= w[u] / left
            left -= w[u]
        for u in seq:
            pi[u] += prob
    return torch.tensor(pi, dtype=torch.float64)


def test_exact_inclusion_matches_enumeration():
    w = [5.0, 3.0, 1.0, 0.5, 0.5]
    k, draws = 2, 20_000
    counts = torch.zeros(5, dtype=torch.float64)
    for t in range(draws):
        mask = ops.sample_exact(torch.tensor(w), k, seed=8, stream=t)
        assert mask.sum() == k
        counts += mask.double()
    expected = _inclusion_by_enumeration(w, k)
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert ((counts / draws - expected).abs() <= 5 * sigma).all()


def test_exact_zero_weights_only_when_needed():
    s = torch.tensor([0.0, 2.0, 0.0, 1.0, 0.0])
    mask = ops.sample_exact(s, 2, seed=1, stream=3)
    assert mask.tolist() == [False, True, False, True, False]
    assert ops.sample_exact(s, 4, seed=1, stream=3).sum() == 4
    assert ops.sample_exact(torch.zeros(6), 3, seed=1).sum() == 3  # uniform fallback


def test_exact_rows():
    s = torch.rand(10, 4)
    mask = ops.sample_exact(s, 3, seed=2, granularity="row")
    assert mask[:, 0].sum() == 3 and torch.equal(mask, mask[:, :1].expand_as(mask))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: ops.inclusion_probs(torch.rand(3), 0.0), ValueError, "ratio"),
        (lambda: ops.inclusion_probs(torch.rand(3), 1.5), ValueError, "ratio"),
        (lambda: ops.inclusion_probs(torch.rand(3), 0.5, min_prob=2), ValueError, "min_prob"),
        (lambda: ops.inclusion_probs(-torch.rand(3), 0.5), ValueError, "importance"),
        (lambda: ops.inclusion_probs(torch.ones(3, dtype=torch.int64), 0.5), TypeError, "importance"),
        (lambda: ops.inclusion_probs(torch.rand(3), 0.5, sampling="exact"), ValueError, "sampling"),
        (lambda: ops.inclusion_probs(torch.rand(3), 0.5, granularity="col"), ValueError, "granularity"),
        (lambda: ops.inclusion_probs([1.0], 0.5), TypeError, "importance"),
        (lambda: ops.inclusion_probs(torch.rand(3).to_sparse(), 0.5), TypeError, "sparse"),
        (lambda: ops.inclusion_probs(torch.rand(3, dtype=torch.complex64), 0.5), TypeError, "complex"),
        (lambda: ops.sample_mask(torch.tensor([0.5, 1.2]), seed=0), ValueError, "probs"),
        (lambda: ops.sample_mask(torch.rand(3), seed=-1), ValueError, "seed"),
        (lambda: ops.sample_mask(torch.rand(3), seed=0, stream=-4), ValueError, "stream"),
        (lambda: ops.sample_mask(torch.rand(3), seed=0.5), TypeError, "seed"),
        (lambda: ops.sample_mask(torch.rand(3, 2), seed=0, granularity="row"), ValueError, "row"),
        (lambda: ops.sample_exact(torch.rand(3), 4, seed=0), ValueError, "k"),
        (lambda: ops.unbiased_rescale(torch.rand(3), torch.ones(3), torch.rand(3)), TypeError, "mask"),
        (lambda: ops.unbiased_rescale(torch.rand(3), torch.ones(4, dtype=torch.bool), torch.rand(4)), ValueError, "mask"),
        (lambda: ops.unbiased_rescale(torch.rand(3), torch.ones(3, dtype=torch.bool), torch.zeros(3)), ValueError, "probs"),
        (lambda: ops.fisher_update_(torch.rand(3), torch.rand(3, device="meta"), 0.9), ValueError, "mixed devices"),
        (lambda: ops.fisher_update_(torch.rand(3), torch.rand(3), 1.0), ValueError, "beta"),
        (lambda: ops.fisher_update_(torch.rand(3).half(), torch.rand(3), 0.5), TypeError, "fisher"),
        (lambda: ops.sample_mask(torch.rand(3), seed=0, backend="gpu"), ValueError, "backend"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_explicit_unavailable_backend_raises():
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.sample_mask(torch.rand(3), seed=0, backend="cuda")


def test_env_backend(monkeypatch):
    monkeypatch.setenv("FASTMASK_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTMASK_BACKEND"):
        ops.sample_mask(torch.rand(3), seed=0)
    monkeypatch.setenv("FASTMASK_BACKEND", "torch")
    assert ops.sample_mask(torch.rand(3), seed=0).dtype == torch.bool
