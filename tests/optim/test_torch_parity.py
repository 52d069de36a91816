"""Ratio 1 and unbiased=False is exactly the base optimizer: compare with torch.optim."""

import pytest
import torch

import fastmask
from tests.config import TOLERANCE
from tests.optim.models import batches, flat_params, loss_of, make_model, train

TOL = TOLERANCE["vs_torch"]  # fastmask vs torch.optim (tests/config.py)

CONFIGS = [
    ("sgd", dict(lr=0.05, momentum=0.9, weight_decay=1e-4), torch.optim.SGD),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True), torch.optim.SGD),
    ("sgd", dict(lr=0.05, momentum=0.5, dampening=0.3, maximize=True), torch.optim.SGD),
    ("sgd", dict(lr=0.05), torch.optim.SGD),
    ("adam", dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-3), torch.optim.Adam),
    ("adamw", dict(lr=1e-2, weight_decay=0.05, eps=1e-6), torch.optim.AdamW),
    ("adamw", dict(lr=1e-2, maximize=True), torch.optim.AdamW),
]


def _pair(base, hyper, torch_cls, **fm_kwargs):
    ref_model, fm_model = make_model(), make_model()
    ref = torch_cls(ref_model.parameters(), **hyper)
    fm = fastmask.AMSS(fm_model.groups(), base=base, **hyper, **fm_kwargs)
    return ref_model, ref, fm_model, fm


@pytest.mark.parametrize("base, hyper, torch_cls", CONFIGS)
@pytest.mark.parametrize("importance", ["grad2", "ema"])
@pytest.mark.parametrize("backend", ["torch", None])  # the reference, and what auto picks here
def test_ratio_one_equals_torch(base, hyper, torch_cls, importance, backend):
    ref_model, ref, fm_model, fm = _pair(base, hyper, torch_cls, importance=importance, backend=backend)
    data = batches(25)
    train(ref_model, ref, data)
    train(fm_model, fm, data, ratios={"audio": 1.0, "visual": 1.0})
    torch.testing.assert_close(flat_params(fm_model), flat_params(ref_model), rtol=TOL, atol=TOL)
    p = next(fm_model.parameters())
    assert fm.state[p]["step"].item() == 25 and fm.state[p]["step"].dtype == torch.float32


def test_state_keys_match_torch():
    ref_model, ref, fm_model, fm = _pair("adamw", dict(lr=1e-2), torch.optim.AdamW)
    data = batches(2)
    train(ref_model, ref, data)
    train(fm_model, fm, data)
    for (_, rs), (_, fs) in zip(ref.state_dict()["state"].items(), fm.state_dict()["state"].items()):
        assert set(rs) == set(fs)


@pytest.mark.parametrize("make_sched", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=25),
])
def test_schedulers(make_sched):
    ref_model, ref, fm_model, fm = _pair("adamw", dict(lr=1e-2), torch.optim.AdamW)
    data = batches(25)
    train(ref_model, ref, data, scheduler=make_sched(ref))
    train(fm_model, fm, data, scheduler=make_sched(fm))
    torch.testing.assert_close(flat_params(fm_model), flat_params(ref_model), rtol=TOL, atol=TOL)
    assert fm.param_groups[0]["betas"] == ref.param_groups[0]["betas"]


def test_reduce_lr_on_plateau_and_tensor_lr():
    ref_model, fm_model = make_model(), make_model()
    ref = torch.optim.Adam(ref_model.parameters(), lr=torch.tensor(0.02))
    fm = fastmask.AMSS(fm_model.groups(), base="adam", lr=torch.tensor(0.02))
    scheds = [torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5) for o in (ref, fm)]
    for batch in batches(20):
        for model, opt, sched in ((ref_model, ref, scheds[0]), (fm_model, fm, scheds[1])):
            opt.zero_grad()
            loss = loss_of(model, batch)
            loss.backward()
            opt.step()
            sched.step(loss.item())
    assert float(fm.param_groups[0]["lr"]) == float(ref.param_groups[0]["lr"]) < 0.02
    torch.testing.assert_close(flat_params(fm_model), flat_params(ref_model), rtol=TOL, atol=TOL)


def test_closure_that_edits_grads():
    ref_model, ref, fm_model, fm = _pair("sgd", dict(lr=0.05, momentum=0.9), torch.optim.SGD)
    for batch in batches(10):
        for model, opt in ((ref_model, ref), (fm_model, fm)):
            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = loss_of(model, batch)
                loss.backward()
                for p in model.parameters():
                    p.grad.mul_(0.5).clamp_(-0.1, 0.1)
                return loss

            loss = opt.step(closure)
            assert loss is not None
    torch.testing.assert_close(flat_params(fm_model), flat_params(ref_model), rtol=TOL, atol=TOL)


def test_load_torch_adamw_checkpoint():
    """A torch.optim.AdamW checkpoint (split over fastmask's groups) resumes identically."""
    ref_model, ref, fm_model, fm = _pair("adamw", dict(lr=1e-2), torch.optim.AdamW)
    data = batches(10)
    train(ref_model, ref, data[:5])
    fm_model.load_state_dict(ref_model.state_dict())
    sd = ref.state_dict()
    ids = iter(sd["param_groups"][0]["params"])
    hyper = {k: v for k, v in sd["param_groups"][0].items() if k != "params"}  # torch's flags are dropped on load
    groups = [{**hyper, "params": [next(ids) for _ in g["params"]]} for g in fm.param_groups]
    fm.load_state_dict({"state": sd["state"], "param_groups": groups})
    train(ref_model, ref, data[5:])
    train(fm_model, fm, data[5:])
    torch.testing.assert_close(flat_params(fm_model), flat_params(ref_model), rtol=TOL, atol=TOL)
