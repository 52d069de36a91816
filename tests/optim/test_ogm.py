"""OGM / OGM-GE: coefficient 1 is the base optimizer, coefficients scale exactly, GE noise."""

import io

import pytest
import torch

import fastmask
from fastmask.reference.philox import STREAM_NOISE, normal, rng_stream
from tests.config import TOLERANCE
from tests.optim.models import batches, flat_params, loss_of, make_model, train

TOL = TOLERANCE["vs_torch"]  # fastmask vs torch.optim (tests/config.py)

def _step(model, opt, batch, **kwargs):
    opt.zero_grad()
    loss_of(model, batch).backward()
    opt.step(**kwargs)


@pytest.mark.parametrize("base, torch_cls, hyper", [
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-4)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2)),
])
def test_coefficient_one_equals_base(base, torch_cls, hyper):
    ref_model, fm_model = make_model(), make_model()
    ref = torch_cls(ref_model.parameters(), **hyper)
    fm = fastmask.OGM(fm_model.groups(), base=base, **hyper)
    data = batches(20)
    train(ref_model, ref, data)
    for batch in data:
        _step(fm_model, fm, batch, coefficients={"audio": 1.0, "visual": 1.0})
    torch.testing.assert_close(flat_params(fm_model), flat_params(ref_model), rtol=TOL, atol=TOL)


def _one_step(p, g, **kwargs):
    coefficients = kwargs.pop("coefficients")
    opt = fastmask.OGM([{"params": [p], "modality": "v"}], seed=3, **kwargs)
    p.grad = g.clone()
    opt.step(coefficients=coefficients)
    return opt


def test_coefficient_scales_sgd_step_exactly():
    g = torch.randn(1000)
    p = torch.nn.Parameter(torch.zeros(1000))
    _one_step(p, g, base="sgd", lr=1.0, coefficients={"v": 0.25})
    assert torch.equal(p.detach(), -(g * 0.25))


def test_update_modulation_scales_the_adam_step():
    g = torch.randn(100)
    p_full, p_mod = torch.nn.Parameter(torch.ones(100)), torch.nn.Parameter(torch.ones(100))
    _one_step(p_full, g, base="adam", lr=0.1, coefficients={"v": 1.0})
    _one_step(p_mod, g, base="adam", lr=0.1, modulate="update", coefficients={"v": 0.3})
    torch.testing.assert_close(p_mod.detach() - 1, (p_full.detach() - 1) * 0.3)
    # grad modulation is cancelled by Adam's normalisation: refused without GE noise, which it scales
    with pytest.raises(ValueError, match="modulate='grad' with base='adam' and ge=False does nothing"):
        _one_step(torch.nn.Parameter(torch.ones(100)), g, base="adam", modulate="grad", coefficients={"v": 0.3})


@pytest.mark.parametrize("base", ["sgd", "adam", "adamw"])
def test_a_coefficient_slows_the_modality_on_every_base_by_default(base):
    """The README's one-liner, fastmask.OGM(groups, lr=...) with each base: a coefficient of 0.3
    moves the modulated params clearly less than 1.0 (Adam's default modulates the update)."""
    moved = {}
    for k in (1.0, 0.3):
        model = make_model()
        opt = fastmask.OGM(model.groups(), base=base, lr=1e-2, seed=0)
        start = [p.detach().clone() for p in model.audio.parameters()]
        for batch in batches(5, seed=2):
            _step(model, opt, batch, coefficients={"audio": k, "visual": 1.0})
        moved[k] = sum((p.detach() - p0).norm() ** 2 for p, p0 in zip(model.audio.parameters(), start)) ** 0.5
    assert opt.param_groups[0]["modulate"] == ("grad" if base == "sgd" else "update")
    assert moved[0.3] < 0.5 * moved[1.0], moved


def test_ge_noise_mean_std_and_stream():
    g = torch.randn(200_000) * 3
    p = torch.nn.Parameter(torch.zeros(200_000))
    _one_step(p, g, base="sgd", lr=1.0, ge=True, coefficients={"v": 0.5})
    noise = -p.detach() - 0.5 * g
    assert abs(noise.mean().item()) < 0.02
    assert noise.std().item() == pytest.approx(g.std().item(), rel=0.01)
    expected = normal(3, rng_stream(1, 0, STREAM_NOISE), 200_000) * g.std()
    torch.testing.assert_close(noise, expected, rtol=1e-4, atol=1e-4)


def test_ge_noise_reaches_modality_groups_only():
    """One step from the same model and gradients with and without GE: every modality tensor
    moves differently (also visual's, at coefficient 1, as the official code adds noise to
    every modality), the dense group (the head) exactly alike."""
    after = {}
    for ge in (False, True):
        model = make_model()
        opt = fastmask.OGM(model.groups(), base="sgd", lr=0.05, ge=ge, seed=7)
        _step(model, opt, batches(1)[0], coefficients={"audio": 0.4, "visual": 1.0})
        after[ge] = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name in after[False]:
        same = torch.equal(after[False][name], after[True][name])
        assert same == name.startswith("head."), name


def test_ge_run_resumes_bit_identically():
    data = batches(8)
    full = make_model()
    opt = fastmask.OGM(full.groups(), lr=1e-2, ge=True, seed=7)
    train_kwargs = dict(coefficients={"audio": 0.4})
    for batch in data:
        _step(full, opt, batch, **train_kwargs)
    part = make_model()
    opt1 = fastmask.OGM(part.groups(), lr=1e-2, ge=True, seed=7)
    for batch in data[:4]:
        _step(part, opt1, batch, **train_kwargs)
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    opt2 = fastmask.OGM(part.groups(), lr=1e-2, ge=True, seed=1)
    opt2.load_state_dict(torch.load(buf))
    assert opt2.coefficient("audio") == 0.4
    for batch in data[4:]:
        _step(part, opt2, batch)
    assert torch.equal(flat_params(part), flat_params(full))


@pytest.mark.parametrize("coefficients, match", [
    ({"audio": -0.1}, "coefficients"),
    ({"audio": float("inf")}, "coefficients"),
    ({"radar": 0.5}, "radar"),
])
def test_bad_coefficients(coefficients, match):
    model = make_model()
    opt = fastmask.OGM(model.groups())
    with pytest.raises(ValueError, match=match):
        opt.step(coefficients=coefficients)
    with pytest.raises(ValueError, match="modulate"):
        fastmask.OGM(model.groups(), modulate="loss")
    with pytest.raises(TypeError, match="ge"):
        fastmask.OGM(model.groups(), ge="yes")
