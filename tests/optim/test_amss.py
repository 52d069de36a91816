"""AMSS / AMSS+ semantics: masks, rescale, freeze vs zero_grad, resume, AMP, non-finite grads."""

import io

import pytest
import torch

import fastmask
from fastmask import ops
from fastmask.reference.philox import rng_stream
from tests.config import TOLERANCE
from tests.optim.models import batches, flat_params, loss_of, make_model, train

TOL = TOLERANCE["vs_torch"]  # fastmask vs torch.optim (tests/config.py)

def _masked_run(model_seed=0, steps=10, **kwargs):
    model = make_model(model_seed)
    opt = fastmask.AMSSPlus(model.groups(), seed=1234, **kwargs)
    train(model, opt, batches(steps), ratios={"audio": 0.3, "visual": 0.6})
    return model, opt


def test_same_seed_same_run_and_seed_from_torch_rng():
    a, _ = _masked_run(lr=1e-2)
    b, _ = _masked_run(lr=1e-2)
    assert torch.equal(flat_params(a), flat_params(b))
    torch.manual_seed(7)
    s1 = fastmask.AMSS([torch.zeros(2, requires_grad=True)]).param_groups[0]["seed"]
    torch.manual_seed(7)
    s2 = fastmask.AMSS([torch.zeros(2, requires_grad=True)]).param_groups[0]["seed"]
    assert s1 == s2


@pytest.mark.parametrize("kwargs", [
    dict(base="adamw", lr=1e-2, importance="ema"),
    dict(base="sgd", lr=0.05, momentum=0.9, granularity="row", sampling="uniform"),
    dict(base="adam", lr=1e-2, sampling="exact", rescale="legacy"),
])
def test_resume_is_bit_identical(kwargs):
    data = batches(12)
    full = make_model()
    opt = fastmask.AMSSPlus(full.groups(), seed=99, **kwargs)
    train(full, opt, data, ratios={"audio": 0.3, "visual": 0.7})

    first = make_model()
    opt1 = fastmask.AMSSPlus(first.groups(), seed=99, **kwargs)
    train(first, opt1, data[:6], ratios={"audio": 0.3, "visual": 0.7})
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu")
    resumed = make_model(seed=5)  # different init and seed: both must come from the checkpoint
    opt2 = fastmask.AMSSPlus(resumed.groups(), seed=1, **kwargs)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, data[6:])  # ratios restored from the checkpoint
    assert torch.equal(flat_params(resumed), flat_params(full))


def test_zero_grad_mode_equals_mask_then_torch():
    """masked="zero_grad": multiply the grad by the same mask, then the torch optimizer."""
    fm_model, ref_model = make_model(), make_model()
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    fm = fastmask.AMSS(fm_model.groups(), base="sgd", masked="zero_grad", seed=5, **hyper)
    ref = torch.optim.SGD(ref_model.parameters(), **hyper)
    ratios = {"audio": 0.4, "visual": 0.7}
    groups = ref_model.groups()
    for step, batch in enumerate(batches(10), start=1):
        fm.zero_grad()
        loss_of(fm_model, batch).backward()
        fm.step(ratios=ratios)
        ref.zero_grad()
        loss_of(ref_model, batch).backward()
        slot = 0
        for group in groups:
            for p in group["params"]:
                if "modality" in group:
                    g = p.grad
                    pi = ops.inclusion_probs(g * g, ratios[group["modality"]])
                    p.grad.mul_(ops.sample_mask(pi, seed=5, stream=rng_stream(step, slot)))
                slot += 1
        ref.step()
    torch.testing.assert_close(flat_params(fm_model), flat_params(ref_model), rtol=TOL, atol=TOL)


def test_freeze_leaves_unselected_units_untouched():
    model = make_model()
    opt = fastmask.AMSS(model.groups(), base="adamw", lr=1e-2, granularity="row", seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, batches(1), ratios={"audio": 0.5, "visual": 0.5})
    conv = model.audio[0].weight
    idx = [i for i, p in enumerate(model.parameters()) if p is conv][0]
    grad_rows = conv.grad.reshape(4, -1)
    changed_rows = (conv.detach() != before[idx]).reshape(4, -1).any(1)
    assert 0 < changed_rows.sum() < 4  # this seed selects some, not all, of the 4 filters
    # whole rows: moments move exactly on the selected rows, wherever the grad is non-zero
    m = opt.state[conv]["exp_avg"].reshape(4, -1)
    assert torch.equal(m != 0, changed_rows[:, None] & (grad_rows != 0))
    assert torch.equal(opt.state[conv]["exp_avg_sq"].reshape(4, -1) != 0, m != 0)
    # dense head: every element updated
    assert (model.head.weight.detach() != before[-2]).all()


def test_amss_plus_sgd_step_is_g_over_pi_on_selected():
    p = torch.nn.Parameter(torch.randn(200))
    g = torch.randn(200)
    opt = fastmask.AMSSPlus([{"params": [p], "modality": "m"}], base="sgd", lr=1.0, seed=11)
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step(ratios={"m": 0.25})
    pi = ops.inclusion_probs(g * g, 0.25)
    mask = ops.sample_mask(pi, seed=11, stream=rng_stream(1, 0))
    torch.testing.assert_close(before - p.detach(), torch.where(mask, g / pi, 0.0), rtol=1e-6, atol=1e-7)
    stats = opt.stats()["m"]
    assert stats["realised_fraction"] == mask.sum().item() / 200
    assert stats["expected_fraction"] == pytest.approx(pi.mean().item(), rel=1e-6)


def test_legacy_rescale_weight():
    p = torch.nn.Parameter(torch.zeros(50))
    g = torch.rand(50) + 0.1
    opt = fastmask.AMSSPlus([{"params": [p], "modality": "m"}], base="sgd", lr=1.0, rescale="legacy",
                            sampling="exact", seed=2)
    p.grad = g.clone()
    opt.step(ratios={"m": 0.2})
    selected = p.detach() != 0
    assert selected.sum() == 10  # ceil(0.2 * 50), exactly
    s = g * g
    expected = -g / (s / s.sum() + 1 / 50)
    torch.testing.assert_close(p.detach()[selected], expected[selected])


def test_nan_grad_skips_that_tensor_only():
    model = make_model()
    opt = fastmask.AMSSPlus(model.groups(), lr=1e-2, seed=0)
    train(model, opt, batches(2), ratios={"audio": 0.5, "visual": 0.5})
    opt.reset_stats()
    conv = model.visual[0].weight
    before = {k: v.clone() for k, v in opt.state[conv].items()}
    p_before = conv.detach().clone()
    others = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_of(model, batches(1, seed=9)[0]).backward()
    conv.grad[0, 0, 0, 0] = float("nan")
    opt.step()
    assert torch.equal(conv.detach(), p_before)
    for k, v in opt.state[conv].items():
        assert torch.equal(v, before[k]), k
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(not torch.equal(p.detach(), o) for p, o in zip(model.parameters(), others)) > 1
    assert opt.stats()["visual"]["skipped_tensors"] == 1


@pytest.mark.parametrize("as_attribute", [False, True])
def test_found_inf_is_a_complete_no_op(as_attribute):
    data = batches(6)
    a, b = make_model(), make_model()
    opt_a = fastmask.AMSSPlus(a.groups(), lr=1e-2, seed=4, importance="ema")
    opt_b = fastmask.AMSSPlus(b.groups(), lr=1e-2, seed=4, importance="ema")
    train(a, opt_a, data, ratios={"audio": 0.5})
    train(b, opt_b, data[:3], ratios={"audio": 0.5})
    snapshot = io.BytesIO()
    torch.save(opt_b.state_dict(), snapshot)
    params = flat_params(b)
    opt_b.zero_grad()
    loss_of(b, data[0]).backward()
    if as_attribute:  # what torch.amp.GradScaler does
        opt_b.found_inf = torch.tensor(1.0)
        opt_b.step()
        del opt_b.found_inf
    else:
        opt_b.step(found_inf=torch.tensor(1.0))
    assert torch.equal(flat_params(b), params)
    snapshot.seek(0)
    old = torch.load(snapshot)
    for (_, s_old), (_, s_new) in zip(old["state"].items(), opt_b.state_dict()["state"].items()):
        assert all(torch.equal(s_old[k], s_new[k]) for k in s_old)
    train(b, opt_b, data[3:])
    assert torch.equal(flat_params(a), flat_params(b))


def test_grad_scale_unscales_inside_the_step():
    data = batches(5)
    a, b = make_model(), make_model()
    opt_a = fastmask.AMSSPlus(a.groups(), lr=1e-2, seed=4)
    opt_b = fastmask.AMSSPlus(b.groups(), lr=1e-2, seed=4)
    train(a, opt_a, data, ratios={"audio": 0.5})
    train(b, opt_b, data, ratios={"audio": 0.5}, loss_scale=1024.0, grad_scale=torch.tensor(1024.0))
    assert torch.equal(flat_params(a), flat_params(b))


def test_grad_scaler_integration():
    data = batches(5)
    a, b = make_model(), make_model()
    opt_a = fastmask.AMSSPlus(a.groups(), lr=1e-2, seed=4)
    opt_b = fastmask.AMSSPlus(b.groups(), lr=1e-2, seed=4)
    train(a, opt_a, data, ratios={"audio": 0.5})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt_b.set_ratios({"audio": 0.5})
    for batch in data:
        opt_b.zero_grad()
        scaler.scale(loss_of(b, batch)).backward()
        scaler.step(opt_b)
        scaler.update()
    assert torch.equal(flat_params(a), flat_params(b))


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_low_precision_params_track_fp32(dtype, tol):
    data32, data16 = batches(8), batches(8, dtype=dtype)
    m32, m16 = make_model(), make_model(dtype=dtype)
    m16.load_state_dict({k: v.to(dtype) for k, v in m32.state_dict().items()})
    m32.load_state_dict({k: v.to(dtype).float() for k, v in m32.state_dict().items()})
    o32 = fastmask.AMSS(m32.groups(), lr=1e-2, seed=1)
    o16 = fastmask.AMSS(m16.groups(), lr=1e-2, seed=1)
    train(m32, o32, data32)
    train(m16, o16, data16)
    assert all(p.dtype == dtype for p in m16.parameters())
    assert all(v.dtype == torch.float32 for s in o16.state.values() for v in s.values())
    torch.testing.assert_close(flat_params(m16), flat_params(m32), rtol=tol, atol=tol)


def test_params_without_grads_zero_size_noncontiguous():
    w = torch.nn.Parameter(torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last))
    empty = torch.nn.Parameter(torch.zeros(0, 3))
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    nograd = torch.nn.Parameter(torch.randn(3))
    opt = fastmask.AMSSPlus([{"params": [w, empty, frozen, nograd], "modality": "m"}], lr=0.1, seed=0)
    g = torch.randn(4, 3, 5, 5)
    w.grad = g.clone().to(memory_format=torch.channels_last)
    empty.grad = torch.zeros(0, 3)
    before = w.detach().clone()
    opt.step(ratios={"m": 0.5})
    # channels_last is updated by logical index: same result as a contiguous copy
    c = torch.nn.Parameter(before.contiguous())
    opt_c = fastmask.AMSSPlus([{"params": [c, torch.nn.Parameter(torch.zeros(0, 3))], "modality": "m"}], lr=0.1, seed=0)
    c.grad = g.clone()
    opt_c.step(ratios={"m": 0.5})
    assert torch.equal(w.detach(), c.detach())
    assert w.is_contiguous(memory_format=torch.channels_last)
    assert frozen not in opt.state and nograd not in opt.state
    assert opt.state[empty]["step"].item() == 1


def test_add_param_group_and_per_group_overrides():
    model = make_model()
    opt = fastmask.AMSSPlus(model.groups()[:2], lr=1e-2, seed=0)
    opt.add_param_group({"params": list(model.head.parameters()), "base": "sgd", "lr": 0.1, "momentum": 0.9})
    assert opt.param_groups[2]["weight_decay"] == 0.0 and opt.param_groups[0]["weight_decay"] == 0.01
    train(model, opt, batches(3), ratios={"audio": 0.5})
    assert "momentum_buffer" in opt.state[model.head.weight]
    assert "exp_avg" in opt.state[model.audio[0].weight]


def test_lr_zero_group_does_not_move():
    model = make_model()
    groups = model.groups()
    groups[2]["lr"] = 0.0
    groups[2]["weight_decay"] = 0.0
    opt = fastmask.AMSS(groups, lr=1e-2)
    head = model.head.weight.detach().clone()
    train(model, opt, batches(3))
    assert torch.equal(model.head.weight.detach(), head)
