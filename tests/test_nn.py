"""OPM drop frequency, expectation preservation, reproducibility; auxiliary heads."""

import math

import pytest
import torch

from fastmask.nn import AuxiliaryHeads, PredictionModulation

Q_V = 0.5 * (1 + 0.5 * math.tanh(1.0))  # rho_v = 2, q_base = lam = 0.5


def _features(batch=4000):
    gen = torch.Generator().manual_seed(0)
    return {"a": torch.randn(batch, 3, generator=gen), "v": torch.randn(batch, 5, generator=gen)}


def test_drop_probs():
    opm = PredictionModulation(0.5, 0.5)
    q = opm.drop_probs({"a": 0.5, "v": 2.0})
    assert q == {"a": 0.0, "v": pytest.approx(Q_V)}


def test_drop_frequency_and_rescale():
    opm = PredictionModulation(p_exe=1.0, seed=1)
    feats = _features()
    out = opm(feats, {"a": 0.5, "v": 2.0})
    assert torch.equal(out["a"], feats["a"])  # weak modality never dropped, scale 1/(1-0)
    dropped = (out["v"] == 0).all(dim=1)
    assert dropped.float().mean().item() == pytest.approx(Q_V, abs=0.03)  # 4000 draws: 4 sigma
    torch.testing.assert_close(out["v"][~dropped], feats["v"][~dropped] / (1 - Q_V))


def test_execute_fraction():
    opm = PredictionModulation(p_exe=0.7, seed=2)
    feats = _features(64)
    executed = [not torch.equal(opm(feats, {"a": 0.5, "v": 2.0})["v"], feats["v"]) for _ in range(2000)]
    assert sum(executed) / 2000 == pytest.approx(0.7, abs=0.05)


def test_expectation_is_preserved():
    opm = PredictionModulation(p_exe=0.7, seed=3)
    feats = _features(50)
    total = {m: torch.zeros_like(z, dtype=torch.float64) for m, z in feats.items()}
    calls = 4000
    for _ in range(calls):
        for m, z in opm(feats, {"a": 0.5, "v": 2.0}).items():
            total[m] += z.double()
    for m, z in feats.items():
        # per-element std of the mean <= |z| * sqrt(q / (1 - q) / calls) < 0.04 |z|
        torch.testing.assert_close(total[m] / calls, z.double(), rtol=0.15, atol=0.02)


def test_shared_rescale_is_the_official_rule():
    opm = PredictionModulation(p_exe=1.0, rescale="shared", seed=4)
    feats = _features(100)
    out = opm(feats, {"a": 0.5, "v": 2.0})
    theta = (5 * Q_V) / 8
    torch.testing.assert_close(out["a"], feats["a"] / (1 - theta))


def test_three_modalities_and_no_sample_loses_everything():
    opm = PredictionModulation(q_base=0.6, lam=0.6, p_exe=1.0, seed=5)
    feats = {"x": torch.ones(500, 2), "y": torch.ones(500, 2), "z": torch.ones(500, 2)}
    out = opm(feats, {"x": 3.0, "y": 3.0, "z": 3.0})
    kept = torch.stack([(o != 0).any(1) for o in out.values()])
    assert kept.any(0).all()


def test_eval_identity_and_reproducible():
    a, b = PredictionModulation(seed=9), PredictionModulation(seed=9)
    feats = _features(32)
    for _ in range(5):
        oa, ob = a(feats, {"a": 0.5, "v": 2.0}), b(feats, {"a": 0.5, "v": 2.0})
        assert all(torch.equal(oa[m], ob[m]) for m in feats)
    c = PredictionModulation(seed=9)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c(feats, {"a": 0.5, "v": 2.0})["v"], a(feats, {"a": 0.5, "v": 2.0})["v"])
    a.eval()
    assert all(torch.equal(a(feats, {"a": 0.1, "v": 9.0})[m], feats[m]) for m in feats)


def test_gradient_flows_with_the_same_scale():
    opm = PredictionModulation(p_exe=1.0, seed=1)
    z = torch.ones(10, 2, requires_grad=True)
    out = opm({"a": torch.ones(10, 1), "v": z}, {"a": 0.5, "v": 2.0})
    out["v"].sum().backward()
    assert torch.equal(z.grad, out["v"].detach())


@pytest.mark.parametrize("call, exc, match", [
    (lambda: PredictionModulation(q_base=0.8, lam=0.5), ValueError, "q_base"),
    (lambda: PredictionModulation(p_exe=1.5), ValueError, "p_exe"),
    (lambda: PredictionModulation(rescale="none"), ValueError, "rescale"),
    (lambda: PredictionModulation()(_features(4), {"a": 1.0}), ValueError, "missing"),
    (lambda: PredictionModulation()({"a": torch.ones(4)}, {"a": 1.0}), ValueError, "2-D"),
    (lambda: PredictionModulation()(_features(4), {"a": -1.0, "v": 1.0}), ValueError, "rho"),
    (lambda: AuxiliaryHeads({"a": 0}, 3), ValueError, "dims"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_auxiliary_heads():
    heads = AuxiliaryHeads({"a": 3, "v": 5}, 4)
    out = heads(_features(7))
    assert {m: o.shape for m, o in out.items()} == {"a": (7, 4), "v": (7, 4)}
    with pytest.raises(ValueError, match="unexpected"):
        heads({**_features(7), "x": torch.ones(7, 2)})
