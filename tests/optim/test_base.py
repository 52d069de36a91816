"""The torch.optim contract, run against every fastmask optimizer (in the spirit of torch's test_optim).

Each optimizer is declared once in ``CASES``; every test below runs on all of them:
checkpoints (``torch.load(weights_only=True)``, deepcopy, pickle, torch.distributed.checkpoint)
resume bit-identically with the method's own state, torch's optimizers and fastmask's load each
other's checkpoints, schedulers cycle the keys torch's optimizers have, closures,
``zero_grad``, ``add_param_group``, ``maximize``, GradScaler and ``found_inf``.
"""

import copy
import io
import math
import pickle
import warnings

import pytest
import torch

import fastmask
from fastmask import significance
from tests.config import TOLERANCE
from tests.optim.models import batches, flat_params, loss_of, make_model, train

# name: (fastmask class, base, hyper-parameters shared with torch, the torch optimizer of that base)
CASES = {
    "amss-sgd": (fastmask.AMSS, "sgd", dict(lr=0.05), torch.optim.SGD),
    "amss+-sgd-momentum": (fastmask.AMSSPlus, "sgd", dict(lr=0.05, momentum=0.9, weight_decay=1e-3), torch.optim.SGD),
    "amss+-adam": (fastmask.AMSSPlus, "adam", dict(lr=1e-2, weight_decay=1e-3), torch.optim.Adam),
    "amss-adamw": (fastmask.AMSS, "adamw", dict(lr=1e-2, betas=(0.8, 0.99)), torch.optim.AdamW),
    "ogm-sgd-momentum": (fastmask.OGM, "sgd", dict(lr=0.05, momentum=0.9, nesterov=True), torch.optim.SGD),
    "ogm-adamw": (fastmask.OGM, "adamw", dict(lr=1e-2), torch.optim.AdamW),
}
TOL = dict(rtol=TOLERANCE["vs_torch"], atol=TOLERANCE["vs_torch"])


def _settings(cls) -> dict:
    """The method's per-modality values for a masked / modulated run."""
    if cls is fastmask.OGM:
        return {"coefficients": {"audio": 0.6, "visual": 0.9}}
    return {"ratios": {"audio": 0.4, "visual": 0.7}}


def _fastmask(case, model, seed=11, as_torch=False, **extra):
    """The case's optimizer with its method's options on (EMA importance, GE noise); ``as_torch``:
    without GE noise, which is added even at coefficient 1, so that it steps as torch's."""
    cls, base, hyper, _ = CASES[case]
    kwargs = dict(importance="ema") if cls is not fastmask.OGM else dict(ge=not as_torch)
    return cls(model.groups(), base=base, seed=seed, backend="torch", **hyper, **kwargs, **extra)


def _torch_twin(case, model, **extra):
    _, _, hyper, torch_cls = CASES[case]
    return torch_cls([{"params": g["params"]} for g in model.groups()], **hyper, **extra)


def _continue_and_compare(case, resume, steps=(6, 4), keeps_stats=True):
    """Train ``steps[0]`` masked steps, hand the run to ``resume(model, opt) -> (model, opt)``, train
    ``steps[1]`` bare ``step()`` calls (the settings must have travelled) and compare bit for bit
    with an uninterrupted run; ``keeps_stats``: the copy's ``stats()`` counters carried on too."""
    cls = CASES[case][0]
    data = batches(sum(steps))
    full = make_model()
    full_opt = _fastmask(case, full)
    train(full, full_opt, data[: steps[0]], **_settings(cls))
    train(full, full_opt, data[steps[0]:])

    first = make_model()
    first_opt = _fastmask(case, first)
    train(first, first_opt, data[: steps[0]], **_settings(cls))
    stats_before = first_opt.stats()
    model, opt = resume(first, first_opt)
    if keeps_stats:
        assert opt.stats() == stats_before
    for name, value in _settings(cls)[cls.SETTING].items():
        assert opt._setting(name) == value
    train(model, opt, data[steps[0]:])
    assert torch.equal(flat_params(model), flat_params(full))
    if keeps_stats:
        assert opt.stats() == full_opt.stats()


# ----------------------------------------------------------------- copies keep the method's state
@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trip_through_weights_only_load(case):
    def resume(model, opt):
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        fresh = make_model(seed=3)
        fresh_opt = _fastmask(case, fresh, seed=99)  # the seed must come from the checkpoint
        fresh.load_state_dict(ckpt["model"])
        fresh_opt.load_state_dict(ckpt["opt"])
        return fresh, fresh_opt

    _continue_and_compare(case, resume)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_settings_seed_and_stats(case, how):
    def resume(model, opt):
        pair = {"model": model, "opt": opt}
        copied = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
        return copied["model"], copied["opt"]

    _continue_and_compare(case, resume)


@pytest.mark.parametrize("case", CASES)
def test_distributed_checkpoint_keeps_settings(case, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def resume(model, opt):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process")
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=tmp_path)
            fresh = make_model(seed=3)
            fresh_opt = _fastmask(case, fresh, seed=99)
            target = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
            dcp.load(target, checkpoint_id=tmp_path)
        set_model_state_dict(fresh, target["model"])
        set_optimizer_state_dict(fresh, fresh_opt, target["optim"])
        return fresh, fresh_opt

    # DCP keeps only "state" and "param_groups": the stats counters (diagnostics) stay behind.
    _continue_and_compare(case, resume, keeps_stats=False)


def test_distributed_checkpoint_alone_carries_ratios_seed_and_steps(tmp_path):
    """DCP keeps only ``state`` and ``param_groups``: that must be enough for the step."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = make_model()
    opt = _fastmask("amss+-adam", model)
    train(model, opt, batches(3), ratios={"audio": 0.25})
    osd = get_optimizer_state_dict(model, opt)
    assert set(osd) == {"state", "param_groups"}
    fresh = make_model()
    fresh_opt = _fastmask("amss+-adam", fresh, seed=1)
    set_optimizer_state_dict(fresh, fresh_opt, osd)
    assert fresh_opt.ratio("audio") == 0.25 and fresh_opt.ratio("visual") == 1.0
    assert fresh_opt.param_groups[0]["seed"] == 11
    assert float(fresh_opt.state[fresh.audio[0].weight]["step"]) == 3


# ----------------------------------------------------------------- checkpoints across optimizers
TORCH_CASES = {  # torch's optimizers, each with the fastmask case of the same base
    "sgd": "amss-sgd",
    "sgd-momentum": "amss+-sgd-momentum",
    "adam": "amss+-adam",
    "adamw": "amss-adamw",
}


@pytest.mark.parametrize("kind", TORCH_CASES)
def test_torch_checkpoint_loads_and_continues_as_torch(kind):
    case = TORCH_CASES[kind]
    data = batches(10)
    ref = make_model()
    ref_opt = _torch_twin(case, ref)
    train(ref, ref_opt, data[:5])
    sd = copy.deepcopy(ref_opt.state_dict())

    model = make_model(seed=4)
    model.load_state_dict(ref.state_dict())
    opt = _fastmask(case, model, seed=21, granularity="row", sampling="uniform")
    before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(sd)
    for old, new in zip(before, opt.param_groups):  # fastmask's own keys stay this optimizer's
        for key in ("modality", "seed", "base", "granularity", "sampling", "ratio", "unbiased"):
            assert new.get(key) == old.get(key), key
    train(ref, ref_opt, data[5:])
    train(model, opt, data[5:])
    torch.testing.assert_close(flat_params(model), flat_params(ref), **TOL)


@pytest.mark.parametrize("kind", TORCH_CASES)
def test_fastmask_checkpoint_loads_into_torch(kind):
    case = TORCH_CASES[kind]
    data = batches(10)
    model = make_model()
    opt = _fastmask(case, model)
    train(model, opt, data[:5])  # ratio 1: the base optimizer
    ref = make_model(seed=4)
    ref.load_state_dict(model.state_dict())
    ref_opt = _torch_twin(case, ref)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, data[5:])
    train(ref, ref_opt, data[5:])
    torch.testing.assert_close(flat_params(ref), flat_params(model), **TOL)


def _torch_state_dict(torch_cls, model, **hyper):
    opt = torch_cls([{"params": g["params"]} for g in model.groups()], **hyper)
    train(model, opt, batches(1))
    return opt.state_dict()


@pytest.mark.parametrize("make_sd, fm_kwargs, match", [
    (lambda m: _torch_state_dict(torch.optim.SGD, m, lr=0.1), dict(base="adamw"), r"torch.optim.SGD group.*'adamw'"),
    (lambda m: _torch_state_dict(torch.optim.Adam, m), dict(base="adamw"), r"torch.optim.Adam group.*'adamw'"),
    (lambda m: _torch_state_dict(torch.optim.AdamW, m), dict(base="adam"), r"torch.optim.AdamW group.*'adam'"),
    (lambda m: _torch_state_dict(torch.optim.AdamW, m, amsgrad=True), dict(base="adamw"), "amsgrad"),
    (lambda m: _torch_state_dict(torch.optim.Adagrad, m), dict(base="adamw"), "neither a fastmask group"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1).state_dict(), dict(base="sgd"), "param groups"),
    (lambda m: fastmask.AMSS(m.groups(), base="sgd").state_dict(), dict(base="adamw"), "base='sgd'"),
])
def test_checkpoint_mismatch_is_a_clear_error_and_loads_nothing(make_sd, fm_kwargs, match):
    model = make_model()
    sd = make_sd(model)
    opt = fastmask.AMSS(model.groups(), seed=1, **fm_kwargs)
    train(model, opt, batches(1), ratios={"audio": 0.5})
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"] and after["fastmask"] == before["fastmask"]


def test_version_1_checkpoint_still_loads():
    """Version 1 kept the settings beside the groups and every base's keys in every group."""
    model = make_model()
    opt = fastmask.AMSSPlus(model.groups(), base="sgd", lr=0.05, seed=2)
    train(model, opt, batches(2), ratios={"audio": 0.3})
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        group.pop("ratio", None)
        group.update(betas=(0.9, 0.999), eps=1e-8)
    sd["fastmask"] = {"version": 1, "ratios": {"audio": 0.3}}
    fresh = fastmask.AMSSPlus(make_model().groups(), base="sgd", lr=0.05, seed=5)
    fresh.load_state_dict(sd)
    assert fresh.ratio("audio") == 0.3 and fresh.ratio("visual") == 1.0
    assert "betas" not in fresh.param_groups[0] and fresh.param_groups[0]["seed"] == 2


# ----------------------------------------------------------------- schedulers see torch's keys
SCHEDULERS = {
    "one-cycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=20),
    "cyclic": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.001, max_lr=0.05, step_size_up=4),
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("case", ["amss+-sgd-momentum", "amss-adamw", "ogm-sgd-momentum"])
def test_momentum_cycling_schedulers_match_torch(case, scheduler):
    base = CASES[case][1]
    ref, model = make_model(), make_model()
    ref_opt, opt = _torch_twin(case, ref), _fastmask(case, model, as_torch=True)
    own, other = ("momentum", "betas") if base == "sgd" else ("betas", "momentum")
    assert own in opt.defaults and other not in opt.defaults
    assert all(own in g and other not in g for g in opt.param_groups)
    data = batches(20)
    train(ref, ref_opt, data, scheduler=SCHEDULERS[scheduler](ref_opt))
    train(model, opt, data, scheduler=SCHEDULERS[scheduler](opt))
    for g_ref, g in zip(ref_opt.param_groups, opt.param_groups):
        assert g[own] == g_ref[own]
    torch.testing.assert_close(flat_params(model), flat_params(ref), **TOL)


def test_group_of_another_base_gets_its_own_keys():
    model = make_model()
    groups = model.groups()
    groups[2].update(base="sgd", momentum=0.9)
    opt = fastmask.AMSS(groups, base="adamw")
    assert "betas" in opt.param_groups[0] and "momentum" not in opt.param_groups[0]
    assert opt.param_groups[2]["momentum"] == 0.9 and "betas" not in opt.param_groups[2]
    train(model, opt, batches(2))


# ----------------------------------------------------------------- strict keys
@pytest.mark.parametrize("group_extra, match", [
    ({"granularty": "row"}, "'granularty'.*did you mean 'granularity'"),
    ({"momentum": 0.9}, "'momentum' belongs to base 'sgd'; base='adamw' takes betas, eps"),
    ({"lr_rate": 0.1}, "'lr_rate'"),
])
def test_unknown_group_key_names_it_and_the_nearest(group_extra, match):
    groups = make_model().groups()
    groups[0].update(group_extra)
    with pytest.raises(ValueError, match=match):
        fastmask.AMSS(groups)


def test_scheduler_and_framework_keys_are_allowed():
    model = make_model()
    groups = model.groups()
    groups[0].update(initial_lr=0.1, max_lr=0.2, min_lr=0.0, name="audio encoder")
    opt = fastmask.AMSS(groups)
    train(model, opt, batches(1), ratios={"audio": 0.5})
    assert opt.param_groups[0]["name"] == "audio encoder"


def test_setting_key_belongs_to_modality_groups():
    groups = make_model().groups()
    groups[2]["ratio"] = 0.5  # the dense head
    with pytest.raises(ValueError, match="'ratio'.*set per modality"):
        fastmask.AMSS(groups)
    groups = make_model().groups()
    groups[0]["ratio"] = 0.5  # an initial ratio for the audio group: allowed
    assert fastmask.AMSS(groups).ratio("audio") == 0.5


def test_typo_in_a_checkpoint_group_is_rejected():
    model = make_model()
    opt = fastmask.AMSS(model.groups(), seed=0)
    sd = opt.state_dict()
    sd["param_groups"][1]["samplig"] = "uniform"
    with pytest.raises(ValueError, match="'samplig'.*did you mean 'sampling'"):
        fastmask.AMSS(make_model().groups(), seed=0).load_state_dict(sd)


# ----------------------------------------------------------------- everyday habits
@pytest.mark.parametrize("case", CASES)
def test_closure_zero_grad_and_maximize_match_torch(case):
    ref, model = make_model(), make_model()
    ref_opt, opt = _torch_twin(case, ref, maximize=True), _fastmask(case, model, as_torch=True, maximize=True)
    for batch in batches(6):
        for m, o, set_to_none in ((ref, ref_opt, True), (model, opt, False)):
            def closure(m=m, o=o, set_to_none=set_to_none):
                o.zero_grad(set_to_none=set_to_none)
                loss = -loss_of(m, batch)
                loss.backward()
                return loss

            assert o.step(closure) is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(flat_params(model), flat_params(ref), **TOL)


@pytest.mark.parametrize("case", CASES)
def test_add_param_group_takes_the_modality_setting_and_base_keys(case):
    cls, base = CASES[case][:2]
    model = make_model()
    groups = model.groups()
    opt = _fastmask(case, model)
    opt.param_groups.clear()
    opt.state.clear()
    opt.add_param_group(groups[0])
    opt.add_param_group(groups[2])
    name, value = next(iter(_settings(cls)[cls.SETTING].items()))
    opt._set_settings({name: value})
    extra = torch.nn.Linear(3, 3)
    opt.add_param_group({"params": list(extra.parameters()), "modality": name})
    assert opt.param_groups[-1][cls.SETTING_LABEL] == value
    assert ("momentum" in opt.param_groups[-1]) == (base == "sgd")
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [extra.weight]})
    with pytest.raises(ValueError, match="share it"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "modality": name,
                             cls.SETTING_LABEL: value / 2})


@pytest.mark.parametrize("case", CASES)
def test_grad_scaler_and_found_inf(case):
    cls = CASES[case][0]
    ref, model = make_model(), make_model()
    ref_opt, opt = _torch_twin(case, ref), _fastmask(case, model, as_torch=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10), torch.amp.GradScaler("cpu", init_scale=2.0**10)]
    for step, batch in enumerate(batches(6)):
        for m, o, scaler in ((ref, ref_opt, scalers[0]), (model, opt, scalers[1])):
            o.zero_grad()
            scaler.scale(loss_of(m, batch)).backward()
            if step == 3:  # an overflow: the step must be skipped and the scale lowered
                next(m.parameters()).grad[0].fill_(float("inf"))
            scaler.step(o)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**10
    torch.testing.assert_close(flat_params(model), flat_params(ref), **TOL)
    assert float(opt.state[next(model.parameters())]["step"]) == 5

    before = flat_params(model).clone()
    steps = [float(s["step"]) for s in opt.state.values()]
    opt.zero_grad()
    loss_of(model, batches(1)[0]).backward()
    opt.step(found_inf=torch.tensor(1.0), **_settings(cls))
    assert torch.equal(flat_params(model), before)
    assert [float(s["step"]) for s in opt.state.values()] == steps


# ----------------------------------------------------------------- smaller items
def test_step_with_a_positional_dict_says_to_pass_it_by_keyword():
    model = make_model()
    opt = fastmask.AMSSPlus(model.groups())
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(TypeError, match=r"by keyword: step\(ratios="):
        opt.step({"audio": 0.5})
    with pytest.raises(TypeError, match="closure must be callable"):
        opt.step(3)
    ogm = fastmask.OGM(make_model().groups())
    with pytest.raises(TypeError, match=r"step\(coefficients="):
        ogm.step({"audio": 0.5})


@pytest.mark.parametrize("mir", [{"a": math.inf, "v": 0.2}, {"a": -math.inf, "v": 0.2}, {"a": math.nan, "v": 0.2}])
def test_amss_ratios_fall_back_on_non_finite_rates(mir):
    assert significance.amss_ratios(mir, fallback=0.5) == {"a": 0.5, "v": 0.5}


def test_ogm_coefficients_above_one_are_rejected():
    opt = fastmask.OGM(make_model().groups())
    with pytest.raises(ValueError, match=r"coefficients\['audio'\] must be in \[0.0, 1.0\]"):
        opt.set_coefficients({"audio": 1.5})
    assert opt.coefficient("audio") == 1.0


def test_version_flag(capsys):
    from fastmask.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastmask {fastmask.__version__}"
