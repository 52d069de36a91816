"""Every bad input raises a clear error naming the problem, and nothing is half-updated."""

import copy

import pytest
import torch

import fastmask
from tests.optim.models import batches, flat_params, loss_of, make_model, train


def _opt(**kwargs):
    model = make_model()
    return model, fastmask.AMSSPlus(model.groups(), **{"seed": 0, **kwargs})


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(base="lamb"), ValueError, "base"),
    (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
    (dict(betas=0.9), ValueError, "betas"),
    (dict(base="sgd", momentum=-0.1), ValueError, "momentum"),
    (dict(base="sgd", nesterov=True), ValueError, "nesterov"),
    (dict(momentum=0.9), TypeError, "'momentum' belongs to base 'sgd'"),
    (dict(base="sgd", eps=1e-8), TypeError, "'eps' belongs to base 'adam' or 'adamw'"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(maximize=1), TypeError, "maximize"),
    (dict(sampling="topk"), ValueError, "sampling"),
    (dict(rescale="none"), ValueError, "rescale"),
    (dict(importance="fisher"), ValueError, "importance"),
    (dict(fisher_beta=1.0), ValueError, "fisher_beta"),
    (dict(granularity="column"), ValueError, "granularity"),
    (dict(masked="drop"), ValueError, "masked"),
    (dict(min_prob=1.5), ValueError, "min_prob"),
    (dict(seed=-3), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(sampling="exact"), ValueError, "rescale='ht'"),
    (dict(ratio=0.5), TypeError, "ratio"),
])
def test_bad_hyperparameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _opt(**kwargs)


def test_bad_group_values_name_the_group():
    model = make_model()
    groups = model.groups()
    groups[1]["lr"] = -1
    with pytest.raises(ValueError, match=r"lr \(param group 1\) must be in \[0"):
        fastmask.AMSS(groups)
    groups = model.groups()
    groups[0]["modality"] = ""
    with pytest.raises(ValueError, match="modality"):
        fastmask.AMSS(groups)


def test_bad_params():
    with pytest.raises(TypeError, match="dtype"):
        fastmask.AMSS([torch.zeros(3, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(TypeError, match="dtype"):
        fastmask.AMSS([torch.zeros(3, dtype=torch.complex128, requires_grad=True)])
    with pytest.raises(TypeError, match="complex, in a group of modality 'a': masked groups take real params only"):
        fastmask.AMSS([{"params": [torch.zeros(3, dtype=torch.complex64, requires_grad=True)], "modality": "a"}])
    with pytest.raises(TypeError, match="set"):
        fastmask.AMSS({torch.zeros(3, requires_grad=True)})
    with pytest.raises(ValueError, match="non-leaf"):
        fastmask.AMSS([torch.zeros(3, requires_grad=True) * 2])


@pytest.mark.parametrize("ratios, match", [
    ({"audio": 0.0}, r"ratios\['audio'\]"),
    ({"audio": 1.01}, r"ratios\['audio'\]"),
    ({"audio": float("nan")}, r"ratios\['audio'\]"),
    ({"video": 0.5}, "'video'"),
])
def test_bad_ratios_change_nothing(ratios, match):
    model, opt = _opt(lr=1e-2)
    train(model, opt, batches(2), ratios={"audio": 0.5})
    before, state = flat_params(model), copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(ValueError, match=match):
        opt.step(ratios={"visual": 0.3, **ratios})
    with pytest.raises(ValueError, match=match):
        opt.set_ratios(ratios)
    assert torch.equal(flat_params(model), before)
    assert opt.ratio("visual") == 1.0 and opt.ratio("audio") == 0.5
    assert opt.state_dict()["state"][0]["step"] == state["state"][0]["step"]


def test_sparse_grad_is_rejected_before_any_update():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    dense = torch.nn.Parameter(torch.randn(4))
    opt = fastmask.AMSS([{"params": [dense], "modality": "a"}, {"params": emb.parameters(), "modality": "b"}])
    dense.grad = torch.ones(4)
    emb(torch.tensor([1, 2])).sum().backward()
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(dense.detach(), before) and not opt.state


def test_amp_arguments():
    model, opt = _opt()
    train(model, opt, batches(1))
    with pytest.raises(TypeError, match="found_inf"):
        opt.step(found_inf=torch.ones(2))
    with pytest.raises(TypeError, match="grad_scale"):
        opt.step(grad_scale=2.0)


def _corrupt(sd, how):
    sd = copy.deepcopy(sd)
    if how == "shape":
        sd["state"][0]["exp_avg"] = torch.zeros(3)
    elif how == "dtype":
        sd["state"][1]["exp_avg"] = sd["state"][1]["exp_avg"].to(torch.int64)
    elif how == "missing_state_key":
        del sd["state"][2]["exp_avg_sq"]
    elif how == "unknown_state_key":
        sd["state"][0]["max_exp_avg_sq"] = sd["state"][0]["exp_avg"]
    elif how == "step_shape":
        sd["state"][0]["step"] = torch.zeros(2)
    elif how == "unknown_param":
        sd["state"][999] = sd["state"][0]
    elif how == "group_count":
        sd["param_groups"] = sd["param_groups"][:2]
    elif how == "group_size":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    elif how == "bad_hyper":
        sd["param_groups"][2]["sampling"] = "bogus"
    elif how == "extra_top_key":
        sd["extra"] = 1
    elif how == "bad_ratio":
        sd["param_groups"][0]["ratio"] = 3.0
    elif how == "unknown_modality":
        sd["fastmask"]["stats"] = {"radar": [0.0, 0.0, 0.0, 0.0]}
    elif how == "unknown_meta_key":
        sd["fastmask"]["ratios"] = {"audio": 0.5}
    return sd


# each corruption -> what its error must name
CORRUPTIONS = {
    "shape": r"\['exp_avg'\] has shape \(3,\)", "dtype": r"\['exp_avg'\] must be floating point",
    "missing_state_key": r"lacks \['exp_avg_sq'\]", "unknown_state_key": r"unknown keys \['max_exp_avg_sq'\]",
    "step_shape": r"\['step'\] must have one element", "unknown_param": "param id 999",
    "group_count": "has 2 param groups; this optimizer has 3", "group_size": r"param_groups\[0\] has \d+ params",
    "bad_hyper": "sampling", "extra_top_key": r"unexpected keys \['extra'\]", "bad_ratio": "ratio",
    "unknown_modality": "'radar'", "unknown_meta_key": "ratios",
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_bad_state_dict_is_rejected_and_nothing_loads(how):
    model, opt = _opt(lr=1e-2)
    train(model, opt, batches(3), ratios={"audio": 0.5})
    good = opt.state_dict()
    fresh_model, fresh = _opt(lr=5e-3)
    train(fresh_model, fresh, batches(1))
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises((ValueError, TypeError), match=CORRUPTIONS[how]):
        fresh.load_state_dict(_corrupt(good, how))
    after = fresh.state_dict()
    assert after["param_groups"] == before["param_groups"] and after["fastmask"] == before["fastmask"]
    for k, s in before["state"].items():
        assert all(torch.equal(s[key], after["state"][k][key]) for key in s)


def test_lr_written_between_steps_is_checked_before_anything_changes():
    """Hyper-parameters are validated when a group is added or loaded; lr, which schedulers
    write, is checked again by every step."""
    model, opt = _opt(lr=1e-2)
    train(model, opt, batches(1), ratios={"audio": 0.5})
    before, steps = flat_params(model), [float(s["step"]) for s in opt.state.values()]
    opt.param_groups[1]["lr"] = -0.5
    opt.zero_grad()
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(ValueError, match=r"lr \(param group 1\) must be in \[0"):
        opt.step()
    assert torch.equal(flat_params(model), before) and [float(s["step"]) for s in opt.state.values()] == steps


@pytest.mark.parametrize("value, exc, match", [
    (torch.tensor([0.3, 0.4]), TypeError, r"ratios\['audio'\] must be a float or a one-element float tensor"),
    (torch.tensor(1), TypeError, "one-element float tensor"),
    (torch.tensor(1.5), ValueError, r"ratios\['audio'\] must be in \(0.0, 1.0\]"),
])
def test_bad_tensor_ratios_change_nothing(value, exc, match):
    model, opt = _opt(lr=1e-2)
    train(model, opt, batches(1), ratios={"audio": 0.5})
    before = flat_params(model)
    opt.zero_grad()
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(exc, match=match):
        opt.step(ratios={"audio": value})
    assert torch.equal(flat_params(model), before) and opt.ratio("audio") == 0.5
