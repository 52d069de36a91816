"""Significance formulas against hand-computed values, M = 2 and M = 3."""

import math

import pytest
import torch
from torch import nn

from fastmask import significance as sig


def _head():
    head = nn.Linear(3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 2.0, -1.0], [0.0, 1.0, 1.0]]))
        head.bias.copy_(torch.tensor([0.4, -0.2]))
    return head


def test_unimodal_logits_concat_slices_with_bias_over_m():
    feats = {"a": torch.tensor([[2.0]]), "v": torch.tensor([[1.0, 3.0]])}
    out = sig.unimodal_logits(_head(), feats, ["a", "v"])
    torch.testing.assert_close(out["a"], torch.tensor([[2.2, -0.1]]))
    torch.testing.assert_close(out["v"], torch.tensor([[-0.8, 3.9]]))


def test_unimodal_logits_three_modalities_bias_over_three():
    head = nn.Linear(3, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        head.bias.fill_(0.9)
    feats = {"x": torch.tensor([[1.0]]), "y": torch.tensor([[1.0]]), "z": torch.tensor([[1.0]])}
    out = sig.unimodal_logits(head, feats, ["z", "x", "y"])  # order decides the columns
    assert [out[m].item() for m in "zxy"] == pytest.approx([1.3, 2.3, 3.3])


def test_unimodal_logits_zero_out_fusion():
    head = _head()
    feats = {"a": torch.tensor([[2.0]]), "v": torch.tensor([[1.0, 3.0]])}
    out = sig.unimodal_logits(None, feats, fusion=lambda f: head(torch.cat([f["a"], f["v"]], 1)))
    torch.testing.assert_close(out["a"], torch.tensor([[2.4, -0.2]]))
    torch.testing.assert_close(out["v"], torch.tensor([[-0.6, 3.8]]))


def test_mutual_information_rate_clean():
    labels = torch.tensor([0, 1])
    logits = {"a": torch.zeros(2, 3), "v": torch.tensor([[math.log(3), 0, -100], [0, math.log(3), -100]])}
    feats = {"a": torch.zeros(2, 2), "v": torch.zeros(2, 4)}
    mir = sig.mutual_information_rate(logits, labels, feats)
    # H(Y) = ln 2 (class 2 unused adds 0); a: ln2 + ln(1/3) over ln 2; v: ln2 + ln(3/4) over ln 4
    assert mir["a"] == pytest.approx((math.log(2) + math.log(1 / 3)) / math.log(2), rel=1e-6)
    assert mir["v"] == pytest.approx(math.log(1.5) / math.log(4), rel=1e-4)


def test_mutual_information_rate_legacy_av():
    labels = torch.tensor([0, 0, 1])
    logits = {"a": torch.tensor([[2.0, 0], [2.0, 0], [0, 2.0]]), "v": torch.zeros(3, 2)}
    feats = {"a": torch.zeros(3, 2), "v": torch.zeros(3, 2)}
    lse = math.log(math.exp(2 / 3) + math.exp(1 / 3))
    h_y = -(2 / 3 * (2 / 3 - lse) + 1 / 3 * (1 / 3 - lse))  # CE of p with p as logits
    score_a = math.log(math.exp(2) / (math.exp(2) + 1))
    mir = sig.mutual_information_rate(logits, labels, feats, legacy="av")
    assert mir["a"] == pytest.approx((score_a + h_y + 0.5) / math.log(2), rel=1e-6)
    assert mir["v"] == pytest.approx((math.log(0.5) + h_y + 0.5) / math.log(2), rel=1e-6)
    bad = {"a": logits["a"], "v": torch.tensor([[-9.0, 9], [-9, 9], [9, -9]])}  # numerator < 0
    assert all(math.isnan(r) for r in sig.mutual_information_rate(bad, labels, feats, legacy="av").values())
    assert sig.amss_ratios({"a": math.nan, "v": 1.0}) == {"a": 0.5, "v": 0.5}


def test_amss_ratios_two_and_three():
    rho = sig.amss_ratios({"a": 0.1, "v": 0.3}, temperature=0.2)
    e = math.e
    assert rho["a"] == pytest.approx(e / (1 + e)) and rho["v"] == pytest.approx(1 / (1 + e))
    assert sig.amss_ratios({"a": 0.0, "b": 0.0, "c": 0.0}) == pytest.approx({"a": 2 / 3, "b": 2 / 3, "c": 2 / 3})
    assert sig.amss_ratios({"a": 0.0, "b": 0.0, "c": 0.0}, bias=0.5) == pytest.approx({"a": 0.9, "b": 0.9, "c": 0.9})
    assert sig.amss_ratios({"a": 5.0, "v": 0.0}, temperature=0.1)["a"] == pytest.approx(0.1)


def test_discrepancy_two_and_three():
    labels = torch.tensor([0])
    logits = {"a": torch.zeros(1, 2), "v": torch.tensor([[math.log(3), 0.0]])}
    rho = sig.discrepancy(logits, labels)
    assert rho["v"] == pytest.approx(1.5) and rho["a"] == pytest.approx(2 / 3)
    three = {**logits, "d": torch.tensor([[0.0, math.log(3)]])}  # true-class prob 1/4
    mean = sig.discrepancy(three, labels)
    assert mean["a"] == pytest.approx((0.5 / 0.75 + 0.5 / 0.25) / 2)
    assert sig.discrepancy(three, labels, rule="min")["a"] == pytest.approx(2.0)


def test_ogm_coefficients():
    k = sig.ogm_coefficients({"a": 2 / 3, "v": 1.5}, alpha=0.8)
    assert k["a"] == 1.0 and k["v"] == pytest.approx(1 - math.tanh(1.2))
    assert sig.ogm_coefficients({"v": 1.5}, 0.8, form="continuous")["v"] == pytest.approx(1 - math.tanh(0.4))
    assert sig.ogm_coefficients({"v": 1.0}, 0.8)["v"] == 1.0


@pytest.mark.parametrize("call, exc, match", [
    (lambda: sig.unimodal_logits(_head(), {"a": torch.ones(1, 1)}, ["a"]), ValueError, "head expects"),
    (lambda: sig.unimodal_logits(_head(), {"a": torch.ones(1, 1), "v": torch.ones(2, 2)}), ValueError, "batch size"),
    (lambda: sig.unimodal_logits(_head(), {"a": torch.ones(1, 1), "v": torch.ones(1, 2)}, ["a", "x"]), ValueError, "order"),
    (lambda: sig.unimodal_logits(nn.ReLU(), {"a": torch.ones(1, 1)}), TypeError, "head"),
    (lambda: sig.unimodal_logits(_head(), {"a": torch.ones(1, 1, 1)}), ValueError, "2-D"),
    (lambda: sig.mutual_information_rate({"a": torch.zeros(2, 2)}, torch.tensor([0, 2]), {"a": torch.zeros(2, 2)}), ValueError, "labels"),
    (lambda: sig.mutual_information_rate({"a": torch.zeros(2, 2)}, torch.tensor([0, 1]), {"b": torch.zeros(2, 2)}), ValueError, "missing"),
    (lambda: sig.mutual_information_rate({"a": torch.zeros(2, 2)}, torch.tensor([0]), {"a": torch.zeros(2, 2)}), ValueError, "shape"),
    (lambda: sig.discrepancy({"a": torch.zeros(2, 2)}, torch.tensor([0, 1])), ValueError, "two"),
    (lambda: sig.discrepancy({"a": torch.zeros(1, 2), "b": torch.zeros(1, 2)}, torch.tensor([0.0])), TypeError, "labels"),
    (lambda: sig.amss_ratios({"a": 1.0}), ValueError, "two"),
    (lambda: sig.amss_ratios({"a": 1.0, "b": 0.0}, temperature=0), ValueError, "temperature"),
    (lambda: sig.amss_ratios({"a": 1.0, "b": 0.0}, bounds=(0.5, 0.2)), ValueError, "bounds"),
    (lambda: sig.ogm_coefficients({"a": 1.2}, alpha=-1), ValueError, "alpha"),
    (lambda: sig.ogm_coefficients({"a": 1.2}, 0.5, form="tpami"), ValueError, "form"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
