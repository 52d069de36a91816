"""MIMO loss value and gradient against the closed form; schedule; bad input."""

import math

import pytest
import torch

from fastmask.losses import gamma_schedule, mimo_loss, unimodal_losses


def test_value():
    fused, l1, l2 = torch.tensor(1.0), torch.tensor(0.5), torch.tensor(2.0)
    out = mimo_loss(fused, {"a": l1, "v": l2}, gamma=2.0, mu=0.5)
    assert out.item() == pytest.approx(1.0 + 2.0 * 0.5 * math.log(math.exp(1.0) + math.exp(4.0)))
    # mu -> 0: the max; the smooth max is within mu log M of it
    assert mimo_loss(fused, [l1, l2], gamma=1.0, mu=1e-3).item() == pytest.approx(3.0, abs=1e-3)


def test_gradient_is_softmax_weighted():
    x = torch.randn(5, requires_grad=True)
    w0, w1, w2 = torch.randn(3, 5)
    f0, f1, f2 = (x * w0).sum(), (x * w1).sum() ** 2 / 10, (x * w2).sum().exp() / 5
    gamma, mu = 0.7, 0.3
    (grad,) = torch.autograd.grad(mimo_loss(f0, [f1, f2], gamma, mu), x, retain_graph=True)
    weights = torch.softmax(torch.stack([f1, f2]).detach() / mu, 0)
    g0, g1, g2 = (torch.autograd.grad(f, x, retain_graph=True)[0] for f in (f0, f1, f2))
    torch.testing.assert_close(grad, g0 + gamma * (weights[0] * g1 + weights[1] * g2))


def test_schedule():
    assert gamma_schedule(5, start=0.0, end=1.0, steps=10) == 0.5
    assert gamma_schedule(50, start=0.0, end=1.0, steps=10) == 1.0
    assert gamma_schedule(5, start=0.1, end=10.0, steps=10, kind="geometric") == pytest.approx(1.0)
    assert gamma_schedule(5, start=0.3, end=10.0, steps=10, kind="constant") == 0.3


def test_unimodal_losses():
    logits = {"a": torch.zeros(4, 3), "v": torch.zeros(4, 3)}
    out = unimodal_losses(logits, torch.tensor([0, 1, 2, 0]))
    assert out["a"].item() == pytest.approx(math.log(3))


@pytest.mark.parametrize("call, match", [
    (lambda: mimo_loss(torch.tensor(1.0), [torch.tensor(1.0)], mu=0.0), "mu"),
    (lambda: mimo_loss(torch.tensor(1.0), [torch.tensor(1.0)], gamma=-1.0), "gamma"),
    (lambda: mimo_loss(torch.ones(2), [torch.tensor(1.0)]), "fused_loss"),
    (lambda: mimo_loss(torch.tensor(1.0), []), "at least one"),
    (lambda: mimo_loss(torch.tensor(1.0), [torch.ones(3)]), r"unimodal_losses\[0\]"),
    (lambda: gamma_schedule(1, start=0.0, end=1.0, steps=5, kind="geometric"), "geometric"),
    (lambda: gamma_schedule(1, start=0.0, end=1.0, steps=0), "steps"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
