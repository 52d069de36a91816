"""State-dict fuzzing: any corruption raises a clear error and loads nothing."""

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmask
from tests.optim.models import batches, make_model, train

CORRUPTIONS = st.sampled_from([
    "shape", "dtype_int", "complex", "meta", "sparse", "not_tensor", "drop_key", "extra_key", "step_vector",
    "wrong_group_count", "short_group", "bad_hyper", "negative_lr", "unknown_param", "bad_ratio", "none_seed",
])


def _trained():
    model = make_model()
    opt = fastmask.AMSSPlus(model.groups(), lr=1e-2, seed=0, importance="ema")
    train(model, opt, batches(2), ratios={"audio": 0.5})
    return model, opt


def _corrupt(sd, how, pid, key):
    state = sd["state"][pid]
    key = key if key in state else "exp_avg"  # dense groups keep no fisher
    if how == "shape":
        state[key] = torch.zeros(state[key].numel() + 1)
    elif how == "dtype_int":
        state[key] = state[key].to(torch.int32)
    elif how == "complex":
        state[key] = state[key].to(torch.complex64)
    elif how == "meta":
        state[key] = torch.empty_like(state[key], device="meta")
    elif how == "sparse":
        state[key] = state[key].reshape(-1).to_sparse()
    elif how == "not_tensor":
        state[key] = [1.0, 2.0]
    elif how == "drop_key":
        state.pop("exp_avg")
    elif how == "extra_key":
        state["momentum"] = torch.zeros(1)
    elif how == "step_vector":
        state["step"] = torch.zeros(3)
    elif how == "wrong_group_count":
        sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))
    elif how == "short_group":
        sd["param_groups"][1]["params"] = sd["param_groups"][1]["params"][1:]
    elif how == "bad_hyper":
        sd["param_groups"][0]["granularity"] = "column"
    elif how == "negative_lr":
        sd["param_groups"][2]["lr"] = -1.0
    elif how == "unknown_param":
        sd["state"][10_000] = state
    elif how == "bad_ratio":
        sd["param_groups"][0]["ratio"] = -0.5
    elif how == "none_seed":
        sd["param_groups"][0]["seed"] = None
    return sd


@settings(max_examples=60, deadline=None)
@given(how=CORRUPTIONS, pid=st.integers(0, 9), key=st.sampled_from(["exp_avg", "exp_avg_sq", "fisher"]))
def test_corrupt_state_dict_raises_and_loads_nothing(how, pid, key):
    _, source = _trained()
    model, target = _trained()
    target.param_groups[0]["lr"] = 0.123  # distinguishable from the source's groups
    before = copy.deepcopy(target.state_dict())
    bad = _corrupt(copy.deepcopy(source.state_dict()), how, pid, key)
    try:
        target.load_state_dict(bad)
    except (ValueError, TypeError) as exc:
        assert str(exc)  # a message that says what is wrong
    else:
        raise AssertionError(f"{how} was accepted")
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"] and after["fastmask"] == before["fastmask"]
    for k, s in before["state"].items():
        assert all(torch.equal(s[name], after["state"][k][name]) for name in s)
