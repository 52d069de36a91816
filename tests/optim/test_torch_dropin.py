"""Drop-in as torch.optim itself behaves: named parameters, torch's error types and wording,
duplicates, and checkpoints that go through a torch optimizer and come back."""

import copy
import warnings

import pytest
import torch

import fastmask
from tests.config import TOLERANCE
from tests.conftest import DEVICE, FAST_BACKENDS
from tests.optim.models import batches, flat_params, make_model, train

OPTIMIZERS = [
    (fastmask.AMSSPlus, dict(lr=1e-2), torch.optim.AdamW),
    (fastmask.AMSS, dict(base="sgd", lr=0.05, momentum=0.9), torch.optim.SGD),
    (fastmask.OGM, dict(lr=1e-2), torch.optim.AdamW),
]


def _named_groups(model):
    return fastmask.modality_groups(model, {"audio": "audio", "visual": "visual"}, named=True)


def _settings(cls):
    return {"coefficients": {"audio": 0.5}} if cls is fastmask.OGM else {"ratios": {"audio": 0.5, "visual": 0.7}}


@pytest.mark.parametrize("cls, kwargs, torch_cls", OPTIMIZERS)
def test_named_parameters_as_torch_keeps_them(cls, kwargs, torch_cls):
    model = make_model()
    opt = cls(model.named_parameters(), **kwargs)
    assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    reference = torch_cls(model.named_parameters(), lr=1e-2)
    assert opt.state_dict()["param_groups"][0]["param_names"] == reference.state_dict()["param_groups"][0][
        "param_names"]
    grouped = cls(_named_groups(model), **kwargs)
    assert grouped.param_groups[0]["param_names"] == [n for n, _ in model.audio.named_parameters(prefix="audio")]
    with pytest.raises(ValueError, match="all optimizer param groups should be with/without names"):
        grouped.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    with pytest.raises(ValueError, match="Some param names are missing"):
        cls([("a", torch.nn.Parameter(torch.zeros(2))), torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("cls, kwargs, torch_cls", OPTIMIZERS)
def test_named_and_unnamed_state_dicts_load_into_each_other(cls, kwargs, torch_cls):
    """As torch: names in a loaded checkpoint replace the optimizer's, a checkpoint without
    names keeps the optimizer's; the steps continue bit-identically either way."""
    data = batches(6, seed=3)
    uninterrupted = make_model()
    train(uninterrupted, cls(_named_groups(uninterrupted), seed=4, **kwargs), data, **_settings(cls))
    for save_named, load_named in ((True, False), (False, True)):
        model = make_model()
        groups = _named_groups(model) if save_named else model.groups()
        first = cls(groups, seed=4, **kwargs)
        train(model, first, data[:3], **_settings(cls))
        sd = copy.deepcopy(first.state_dict())
        second = cls(_named_groups(model) if load_named else model.groups(), seed=9, **kwargs)
        second.load_state_dict(sd)
        assert ("param_names" in second.param_groups[0]) == (save_named or load_named)
        train(model, second, data[3:], **_settings(cls))
        assert torch.equal(flat_params(model), flat_params(uninterrupted))


@pytest.mark.parametrize("cls, kwargs, torch_cls", OPTIMIZERS)
def test_a_checkpoint_through_a_torch_optimizer_comes_back(cls, kwargs, torch_cls):
    """fastmask -> torch (load, save) -> fastmask continues bit-identically to an uninterrupted
    run; after a torch step in between, it still loads (torch's flags are understood)."""
    data = batches(6, seed=5)
    uninterrupted = make_model()
    train(uninterrupted, cls(uninterrupted.groups(), seed=2, **kwargs), data, **_settings(cls))
    model = make_model()
    opt = cls(model.groups(), seed=2, **kwargs)
    train(model, opt, data[:3], **_settings(cls))
    through_torch = torch_cls(model.groups(), lr=1e-2)
    through_torch.load_state_dict(copy.deepcopy(opt.state_dict()))
    sd = through_torch.state_dict()
    assert {"foreach", "maximize"} <= set(sd["param_groups"][0])  # torch added its flags
    back = cls(model.groups(), seed=7, **kwargs)
    back.load_state_dict(sd)
    train(model, back, data[3:], **_settings(cls))
    assert torch.equal(flat_params(model), flat_params(uninterrupted))
    stepped = torch_cls(model.groups(), lr=1e-2)
    stepped.load_state_dict(copy.deepcopy(back.state_dict()))
    train(model, stepped, data[:1])
    cls(model.groups(), **kwargs).load_state_dict(stepped.state_dict())


def test_torch_flags_that_change_the_math_are_refused_and_nothing_loads():
    model = make_model()
    opt = fastmask.AMSSPlus(model.groups(), lr=1e-2)
    train(model, opt, batches(1), ratios={"audio": 0.5})
    before = copy.deepcopy(opt.state_dict())
    for key, value, match in (("amsgrad", True, "amsgrad=True"), ("differentiable", True, "differentiable=True"),
                              ("decoupled_weight_decay", False, "decoupled_weight_decay=False")):
        bad = copy.deepcopy(before)
        bad["param_groups"][1][key] = value
        with pytest.raises(ValueError, match=rf"param_groups\[1\] has {match}"):
            opt.load_state_dict(bad)
        assert opt.state_dict()["param_groups"] == before["param_groups"]
    ok = copy.deepcopy(before)
    for g in ok["param_groups"]:
        g.update(foreach=True, fused=None, capturable=False, amsgrad=False, decoupled_weight_decay=True)
    opt.load_state_dict(ok)
    assert "foreach" not in opt.param_groups[0]


@pytest.mark.parametrize("fm_cls, torch_cls, kwargs, error, torch_words", [
    (fastmask.AMSSPlus, torch.optim.AdamW, dict(lr=torch.tensor([1e-3, 1e-3])), ValueError,
     "Tensor lr must be 1-element"),
    (fastmask.AMSSPlus, torch.optim.AdamW, dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    (fastmask.AMSSPlus, torch.optim.AdamW, dict(betas=(1.0, 0.999)), ValueError,
     "Invalid beta parameter at index 0: 1.0"),
    (fastmask.AMSSPlus, torch.optim.AdamW, dict(betas=(0.9, torch.tensor(0.999))), ValueError,
     "betas must be either both floats or both Tensors"),
    (fastmask.AMSSPlus, torch.optim.AdamW, dict(eps=-1e-8), ValueError, "Invalid epsilon value: -1e-08"),
    (fastmask.AMSSPlus, torch.optim.AdamW, dict(weight_decay=-1), ValueError, "Invalid weight_decay value: -1"),
    (fastmask.AMSS, torch.optim.SGD, dict(base="sgd", momentum=-0.5), ValueError, "Invalid momentum value: -0.5"),
])
def test_errors_carry_torch_type_and_wording_and_name_the_argument(fm_cls, torch_cls, kwargs, error, torch_words):
    """The same arguments make torch's optimizer raise the same type with the same words; ours
    raise that too, and name the argument."""
    def params():
        return [torch.nn.Parameter(torch.zeros(3))]

    torch_kwargs = {k: v for k, v in kwargs.items() if k != "base"}
    with pytest.raises(error, match=torch_words):
        torch_cls(params(), **torch_kwargs)
    argument = next(k for k in kwargs if k != "base")
    with pytest.raises(error, match=torch_words) as raised:
        fm_cls(params(), **kwargs)
    assert argument in str(raised.value) or "Tensor lr" in str(raised.value)


@pytest.mark.parametrize("params, torch_words", [
    (torch.nn.Parameter(torch.zeros(3)), "params argument given to the optimizer should be an iterable"),
    ([torch.nn.Parameter(torch.zeros(3)), "x"], "optimizer can only optimize Tensors"),
])
def test_bad_params_raise_torch_type_and_wording(params, torch_words):
    with pytest.raises(TypeError, match=torch_words):
        torch.optim.AdamW(params)
    with pytest.raises(TypeError, match=torch_words):
        fastmask.AMSSPlus(params)


def test_duplicates_in_a_group_warn_as_torch_and_step_once():
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = fastmask.AMSS([p, p], base="sgd", lr=1.0)
    assert opt.param_groups[0]["params"] == [p]
    p.grad = torch.ones(4)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(4))  # stepped once
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        fastmask.AMSS([{"params": [p]}, {"params": [p]}], base="sgd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastmask.AMSS([p], base="sgd")


@pytest.mark.parametrize("backend", ["torch", *FAST_BACKENDS])
@pytest.mark.parametrize("cls, kwargs, torch_cls", OPTIMIZERS)
def test_complex_params_step_as_torch_steps_them(cls, kwargs, torch_cls, backend):
    """In a group without modality a complex param steps as its view_as_real on every backend
    (bit for bit), as torch's optimizer steps it (to rounding), with complex states as torch's."""
    torch.manual_seed(0)
    start = torch.randn(4, 3, dtype=torch.complex64, device=DEVICE)
    complex_param, real_param, torch_param = (torch.nn.Parameter(t) for t in
                                              (start.clone(), torch.view_as_real(start).clone(), start.clone()))
    opts = [cls([complex_param], seed=1, backend=backend, **kwargs), cls([real_param], seed=1, backend=backend, **kwargs),
            torch_cls([torch_param], **{k: v for k, v in kwargs.items() if k != "base"})]
    for _ in range(3):
        grad = torch.randn_like(start)
        complex_param.grad, real_param.grad, torch_param.grad = grad.clone(), torch.view_as_real(grad).clone(), grad.clone()
        for opt in opts:
            opt.step()
    assert torch.equal(torch.view_as_real(complex_param.detach()), real_param.detach())
    torch.testing.assert_close(complex_param.detach(), torch_param.detach(), rtol=TOLERANCE["vs_torch"],
                               atol=TOLERANCE["vs_torch"])
    state, torch_state = opts[0].state[complex_param], opts[2].state[torch_param]
    for key, value in state.items():
        if key != "step":
            assert value.dtype == torch_state[key].dtype == torch.complex64


def test_complex_param_moved_into_a_masked_group_is_refused_at_the_step():
    complex_param = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    real_param = torch.nn.Parameter(torch.randn(3))
    opt = fastmask.AMSSPlus([{"params": [real_param, complex_param]}])
    opt.param_groups[0]["modality"] = "audio"
    real_param.grad, complex_param.grad = torch.ones(3), torch.ones(3, dtype=torch.complex64)
    before = real_param.detach().clone()
    with pytest.raises(TypeError, match=r"param group 0, params\[1\] is complex, in a group of modality 'audio'"):
        opt.step()
    assert torch.equal(real_param.detach(), before) and not opt.state
