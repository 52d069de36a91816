"""torch's generic optimizer checks, run on fastmask through torch's own ``OptimizerInfo`` machinery.

PyTorch tests every optimizer it ships with one suite (``TestOptimRenewed`` in its
``test/test_optim.py``) over a database of ``OptimizerInfo`` entries
(``torch.testing._internal.common_optimizers``, shipped in the wheel). ``FASTMASK_DB`` below
declares each fastmask optimizer the same way: dense, and with its params in one masked
(or modulated) modality group. The configurations come from torch's own input functions for
the base (AdamW's and SGD's, less what fastmask refuses by design, which the error inputs check
instead), and the error inputs are torch's (its wording, its error types) plus fastmask's own.
The checks are written here, after the ones torch runs on its optimizers (CPU, fp32).
"""

from __future__ import annotations

import copy
import functools
import io
from typing import Any

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import fastmask

_frozen = torch.backends.flags_frozen()
from torch.testing._internal.common_optimizers import (  # noqa: E402
    ErrorOptimizerInput, OptimizerErrorEnum, OptimizerInfo, OptimizerInput, optim_error_inputs_func_adamw,
    optim_error_inputs_func_sgd, optim_inputs_func_adamw, optim_inputs_func_sgd)

if not _frozen:
    # torch's test utilities freeze torch.backends flags for the whole process on import (torch's own
    # suite sets them with context managers); the rest of this suite, Lightning's Trainer included,
    # sets them directly, so they are thawed again.
    setattr(torch.backends, "__allow_nonbracketed_mutation_flag", True)

MASKED = "m"  # the modality of the masked entries' group
# torch error inputs about its foreach implementation, which fastmask does not have (it refuses
# foreach=... as an unknown argument, a TypeError, checked in tests/optim/test_torch_dropin.py)
TORCH_ONLY_ERRORS = ("foreach",)


def _entry(cls: type, base: str, masked: bool, setting: float) -> type:
    """``cls`` with ``base``, a fixed seed (two optimizers built alike step alike, as torch's do)
    and, if ``masked``, every param group in modality ``MASKED`` at ``setting``."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        if masked and not isinstance(params, torch.Tensor):  # a bare tensor is left to be refused
            params = list(params)
            if not params or not isinstance(params[0], dict):
                params = [{"params": params}]
            params = [{**group, "modality": MASKED, cls.SETTING_LABEL: setting} for group in params]
        cls.__init__(self, params, **{"base": base, "seed": 0, **kwargs})

    name = f"{cls.__name__}_{base}_{'masked' if masked else 'dense'}"
    return type(name, (cls,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})


def _without(func, refused: tuple[str, ...]):
    """torch's input function for the base, less the configurations that ask for ``refused`` flags."""
    def inputs(device, dtype=None):
        return [i for i in func(device, dtype) if not any(i.kwargs.get(flag) for flag in refused)]
    return inputs


def _with(func, *extra: OptimizerInput):
    def inputs(device, dtype=None):
        return [*func(device, dtype), *copy.deepcopy(extra)]
    return inputs


def _errors(func, *extra: ErrorOptimizerInput):
    def inputs(device, dtype):
        kept = [e for e in func(device, dtype)
                if not any(word in e.optimizer_error_input.desc for word in TORCH_ONLY_ERRORS)]
        return [*kept, *extra]
    return inputs


SAMPLE = functools.partial(torch.randn, 2, 2)
FASTMASK_ERRORS = (
    ErrorOptimizerInput(OptimizerInput(params=None, kwargs=dict(amsgrad=True), desc="no AMSGrad"),
                        error_type=TypeError, error_regex="unexpected argument 'amsgrad'"),
    ErrorOptimizerInput(OptimizerInput(params=None, kwargs=dict(lr=-0.1), desc="negative lr"),
                        error_type=ValueError, error_regex=r"Invalid learning rate: -0.1 \(lr must be in"),
)
ADAM_ERRORS = FASTMASK_ERRORS + (
    ErrorOptimizerInput(OptimizerInput(params=None, kwargs=dict(eps=-1.0), desc="negative eps"),
                        error_type=ValueError, error_regex=r"Invalid epsilon value: -1.0 \(eps must be in"),
)
METHOD_INPUTS = {
    fastmask.AMSS: (OptimizerInput(params=None, kwargs=dict(importance="ema", granularity="row"), desc="ema rows"),),
    fastmask.AMSSPlus: (OptimizerInput(params=None, kwargs=dict(sampling="uniform", weight_decay=0.1), desc="uniform"),),
    fastmask.OGM: (OptimizerInput(params=None, kwargs=dict(ge=True), desc="OGM-GE"),),
}


def _info(cls: type, base: str, masked: bool) -> OptimizerInfo:
    adam = base != "sgd"
    inputs = _without(optim_inputs_func_adamw, ("amsgrad",)) if adam else optim_inputs_func_sgd
    errors = _errors(optim_error_inputs_func_adamw, *ADAM_ERRORS) if adam else _errors(optim_error_inputs_func_sgd,
                                                                                          *FASTMASK_ERRORS)
    return OptimizerInfo(
        _entry(cls, base, masked, setting=0.5),
        optim_inputs_func=_with(inputs, *METHOD_INPUTS[cls]),
        optim_error_inputs_func=errors,
        supported_impls=(),  # no foreach / fused / differentiable switches: one fused step
        not_og_supported_flags=("maximize",),
        supports_sparse=False,  # sparse gradients are refused (test_sparse_gradients_are_refused)
        supports_complex=not masked,  # complex params step as their view_as_real in dense groups only
        scheduler_inputs=([lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: ReduceLROnPlateau(opt)],),
    )


FASTMASK_DB = [_info(cls, base, masked) for cls, base in ((fastmask.AMSSPlus, "adamw"), (fastmask.AMSS, "sgd"),
                                                          (fastmask.OGM, "adamw"))
               for masked in (False, True)]
by_name = pytest.mark.parametrize("info", FASTMASK_DB, ids=lambda info: info.name)


def _inputs(info: OptimizerInfo) -> list[OptimizerInput]:
    return info.optim_inputs_func("cpu", torch.float32)


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Nested state dicts equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _linear(contiguous: bool = True, seed: int = 0) -> tuple[Parameter, Parameter, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        weight, bias = torch.randn(10, 5, generator=gen), torch.randn(10, generator=gen)
    else:
        weight, bias = torch.randn(10, 5, 2, generator=gen)[..., 0], torch.randn(10, 2, generator=gen)[..., 0]
    return Parameter(weight), Parameter(bias), torch.randn(5, generator=gen)


def _loss_closure(optimizer, weight, bias, input):
    def closure():
        optimizer.zero_grad()
        loss = (weight.mv(input) + bias).pow(2).sum()
        loss.backward()
        return loss
    return closure


@by_name
def test_errors(info):
    """torch's error inputs for the base (type and wording) and fastmask's own."""
    for error_input in info.optim_error_inputs_func("cpu", torch.float32):
        optim_input = error_input.optimizer_error_input
        params = optim_input.params if optim_input.params is not None else [Parameter(SAMPLE())]
        assert error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
        if issubclass(error_input.error_type, Warning):
            with pytest.warns(error_input.error_type, match=error_input.error_regex):
                info.optim_cls(params, **optim_input.kwargs)
        else:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                info.optim_cls(params, **optim_input.kwargs)


@by_name
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_scheduler", [False, True])
def test_goes_right_direction(info, contiguous, with_scheduler):
    """20 steps on a linear model lower the loss (raise it with maximize), with torch's schedulers too."""
    for schedulers in info.scheduler_inputs if with_scheduler else [()]:
        for optim_input in _inputs(info):
            weight, bias, input = _linear(contiguous)
            optimizer = info.optim_cls([weight, bias], **optim_input.kwargs)
            scheduled = [make(optimizer) for make in schedulers]
            closure = _loss_closure(optimizer, weight, bias, input)
            initial = closure().item()
            for _ in range(20):
                loss = closure()
                optimizer.step()
                for scheduler in scheduled:
                    scheduler.step(loss.detach()) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
            final = closure().item()
            if optim_input.kwargs.get("maximize", False):
                assert final > initial, optim_input.desc
            else:
                assert final < initial, optim_input.desc


@by_name
def test_tensor_lr_steps_as_float_lr(info):
    """A one-element tensor lr steps as the same float lr."""
    for optim_input in _inputs(info):
        if isinstance(optim_input.kwargs.get("lr"), torch.Tensor):
            continue
        lr = optim_input.kwargs.get("lr", 1e-3)
        runs = []
        for value in (lr, torch.tensor(lr)):
            weight, bias, input = _linear()
            optimizer = info.optim_cls([weight, bias], **{**optim_input.kwargs, "lr": value})
            closure = _loss_closure(optimizer, weight, bias, input)
            for _ in range(5):
                optimizer.step(closure)
            runs.append((weight.detach(), bias.detach()))
        # as torch's check: close, not equal (a float lr enters the scalar math in double precision)
        torch.testing.assert_close(runs[0], runs[1], msg=optim_input.desc)


@by_name
def test_complex(info):
    """A complex param steps as its view_as_real (dense groups), or is refused before anything changes."""
    for optim_input in _inputs(info):
        complex_param = torch.randn(5, 5, dtype=torch.complex64, requires_grad=True)
        real_param = torch.view_as_real(complex_param).detach().clone().requires_grad_()
        if not info.supports_complex:
            with pytest.raises(TypeError, match="is complex, in a group of modality"):
                info.optim_cls([complex_param], **optim_input.kwargs)
            continue
        complex_opt = info.optim_cls([complex_param], **optim_input.kwargs)
        real_opt = info.optim_cls([real_param], **optim_input.kwargs)
        for _ in range(3):
            complex_param.grad = torch.randn_like(complex_param)
            real_param.grad = torch.view_as_real(complex_param.grad).clone()
            complex_opt.step()
            real_opt.step()
            assert torch.equal(torch.view_as_real(complex_param), real_param), optim_input.desc
        assert all(v.is_complex() for k, v in complex_opt.state[complex_param].items() if k != "step")


def _rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    x, y = xy
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@by_name
def test_complex_2d(info):
    """A complex pair steps as its real and imaginary parts stepped as two real params."""
    if not info.supports_complex:
        pytest.skip("masked groups refuse complex params (test_complex)")
    for optim_input in _inputs(info):
        a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
        a1_real, a1_imag = a1.real.clone().detach().requires_grad_(), a1.imag.clone().detach().requires_grad_()
        optim1 = info.optim_cls([a1], **optim_input.kwargs)
        optim2 = info.optim_cls([a1_real, a1_imag], **optim_input.kwargs)
        for _ in range(10):
            optim1.zero_grad()
            optim2.zero_grad()
            _rosenbrock(a1).abs().backward()
            # the same numbers (two autograd graphs may differ in the last bit): the step is under test
            a1_real.grad, a1_imag.grad = a1.grad.real.clone(), a1.grad.imag.clone()
            optim1.step()
            optim2.step()
            assert torch.equal(a1.real, a1_real) and torch.equal(a1.imag, a1_imag), optim_input.desc


@by_name
def test_sparse_gradients_are_refused(info):
    """torch's SGD takes sparse COO grads; fastmask refuses them at the step, naming the param,
    with nothing changed (README, "As torch.optim behaves")."""
    param = Parameter(torch.tensor([1.5, 1.5]))
    optimizer = info.optim_cls([param], **_inputs(info)[0].kwargs)
    param.grad = torch.sparse_coo_tensor(torch.tensor([[0, 0]]), torch.tensor([0.5, 0.25]), (2,),
                                         check_invariants=True)
    with pytest.raises(RuntimeError, match=r"param group 0, params\[0\] has a torch.sparse_coo gradient"):
        optimizer.step()
    assert torch.equal(param.detach(), torch.tensor([1.5, 1.5])) and not optimizer.state


@by_name
def test_step_is_noop_when_params_have_no_grad(info):
    params = [torch.randn(2, 3) for _ in range(2)]
    before = [p.clone() for p in params]
    for optim_input in _inputs(info):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        assert optimizer.step(lambda: torch.tensor([1.0])).item() == 1.0
        assert not optimizer.state
    _assert_same(params, before)


@by_name
def test_step_is_noop_for_zero_grads(info):
    """Without weight decay, a zero gradient moves nothing (states may start, as torch's do)."""
    param = Parameter(torch.randn(5, 1))
    before = param.detach().clone()
    for optim_input in _inputs(info):
        kwargs = {**optim_input.kwargs, "weight_decay": 0.0}
        optimizer = info.optim_cls([param], **kwargs)
        param.grad = torch.zeros_like(param)
        optimizer.step()
        assert torch.equal(param.detach(), before), optim_input.desc


@by_name
def test_optimizer_can_be_printed(info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for optim_input in _inputs(info):
        text = repr(info.optim_cls(params, **optim_input.kwargs))
        assert text.startswith(info.name) and "Parameter Group 0" in text


def _named(weight: Parameter, bias: Parameter, named: bool) -> list:
    return [("weight", weight), ("bias", bias)] if named else [weight, bias]


def _primed(info: OptimizerInfo, optim_input: OptimizerInput, seed: int, steps: int, named: bool = False):
    """An optimizer for a fresh linear model, stepped ``steps`` times; with the model."""
    weight, bias, input = _linear(seed=seed)
    optimizer = info.optim_cls(_named(weight, bias, named), **optim_input.kwargs)
    closure = _loss_closure(optimizer, weight, bias, input)
    for _ in range(steps):
        optimizer.step(closure)
    return optimizer, (weight, bias, input)


def _resume_and_compare(info: OptimizerInfo, optim_input: OptimizerInput, optimizer, model, state_dict,
                        named: bool = False, steps: int = 3):
    """A second optimizer on a copy of ``model``'s params loads ``state_dict``; both step
    ``steps`` times side by side, equal bit for bit after each. Returns the second."""
    weight, bias, input = model
    weight_c, bias_c = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
    optimizer_c = info.optim_cls(_named(weight_c, bias_c, named), **optim_input.kwargs)
    optimizer_c.load_state_dict(state_dict)
    closure, closure_c = _loss_closure(optimizer, weight, bias, input), _loss_closure(optimizer_c, weight_c, bias_c,
                                                                                      input)
    for _ in range(steps):
        optimizer.step(closure)
        optimizer_c.step(closure_c)
        _assert_same((weight, bias), (weight_c, bias_c), optim_input.desc)
    return optimizer_c


@by_name
@pytest.mark.parametrize("named", [False, True])
def test_state_dict_deterministic(info, named):
    """A copy loaded from a checkpoint steps as the original; the checkpoint is left as it was;
    equal params give equal state dicts; repeated groups have identical entries."""
    for optim_input in _inputs(info):
        optimizer, model = _primed(info, optim_input, seed=1, steps=10, named=named)
        state_dict = copy.deepcopy(optimizer.state_dict())
        state_dict_c = copy.deepcopy(optimizer.state_dict())
        optimizer_c = _resume_and_compare(info, optim_input, optimizer, model, state_dict_c, named, steps=10)
        _assert_same(state_dict, state_dict_c, "the loaded checkpoint was modified")
        _assert_same(optimizer.state_dict(), optimizer_c.state_dict(), optim_input.desc)
        optimizer_c.param_groups.extend(optimizer_c.param_groups)
        _assert_same(optimizer.state_dict()["param_groups"][-1], optimizer_c.state_dict()["param_groups"][-1])


@by_name
def test_can_load_older_state_dict(info):
    """A checkpoint from before a flag existed (torch's ``not_og_supported_flags``) loads and steps."""
    for optim_input in _inputs(info):
        optimizer, model = _primed(info, optim_input, seed=0, steps=3)
        state_dict = copy.deepcopy(optimizer.state_dict())
        for group in state_dict["param_groups"]:
            for flag in info.not_og_supported_flags:
                group.pop(flag, None)
        older = _resume_and_compare(info, optim_input, optimizer, model, state_dict, steps=1)
        assert older.param_groups[0]["maximize"] == optimizer.param_groups[0]["maximize"]


@by_name
def test_can_load_from_to_named_state_dict(info):
    for saved_named, loaded_named in ((False, False), (False, True), (True, False), (True, True)):
        for optim_input in _inputs(info):
            optimizer, model = _primed(info, optim_input, seed=2, steps=3, named=saved_named)
            state_dict = copy.deepcopy(optimizer.state_dict())
            optimizer_c = _resume_and_compare(info, optim_input, optimizer, model, state_dict, loaded_named)
            if saved_named or loaded_named:  # names from the checkpoint, else the optimizer's own
                assert optimizer_c.param_groups[0]["param_names"] == ["weight", "bias"]
            else:
                assert "param_names" not in optimizer_c.param_groups[0]


@by_name
def test_save_load_equality_with_weights_only(info):
    for optim_input in _inputs(info):
        optimizer, model = _primed(info, optim_input, seed=3, steps=3)
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        _assert_same(loaded, optimizer.state_dict())
        _resume_and_compare(info, optim_input, optimizer, model, loaded)


@by_name
def test_load_nontensor_step(info):
    """Checkpoints whose ``step`` is a Python number load, and continue as tensor steps do."""
    for optim_input in _inputs(info):
        optimizer, model = _primed(info, optim_input, seed=4, steps=3)
        state_dict = copy.deepcopy(optimizer.state_dict())
        for state in state_dict["state"].values():
            state["step"] = state["step"].item()
        optimizer_c = _resume_and_compare(info, optim_input, optimizer, model, state_dict)
        assert all(s["step"].dtype == torch.float32 for s in optimizer_c.state.values())


@by_name
def test_deepcopy_copies_all_public_attrs(info):
    weight, bias, input = _linear()
    optimizer = info.optim_cls([weight, bias], **_inputs(info)[0].kwargs)
    optimizer.step(_loss_closure(optimizer, weight, bias, input))
    public = {k for k in optimizer.__dict__ if not k.startswith("_")}
    assert public == {k for k in copy.deepcopy(optimizer).__dict__ if not k.startswith("_")}


@by_name
def test_param_groups_weight_decay_and_lr(info):
    """Per-group hyper-parameters: a group without weight decay and a group at lr 0 (which moves nothing)."""
    for optim_input in _inputs(info):
        weight, bias, input = _linear(seed=5)
        frozen = Parameter(torch.randn(3))
        before = frozen.detach().clone()
        optimizer = info.optim_cls([dict(params=[weight], **optim_input.kwargs),
                                    dict(params=[bias], **{**optim_input.kwargs, "weight_decay": 0.0}),
                                    dict(params=[frozen], **{**optim_input.kwargs, "lr": 0.0})])
        closure = _loss_closure(optimizer, weight, bias, input)
        initial = closure().item()
        for _ in range(20):
            closure()
            frozen.grad = torch.ones_like(frozen)
            optimizer.step()
        final = closure().item()
        assert final > initial if optim_input.kwargs.get("maximize", False) else final < initial, optim_input.desc
        assert torch.equal(frozen.detach(), before), optim_input.desc


@by_name
def test_step_hooks(info):
    """Pre and post step hooks, global and per optimizer, in torch's order; removable."""
    weight, bias, input = _linear()
    optimizer = info.optim_cls([weight, bias], **_inputs(info)[0].kwargs)
    calls: list[str] = []
    handles = [
        register_optimizer_step_pre_hook(lambda opt, args, kwargs: calls.append("global pre")),
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre")),
        optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post")),
        register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append("global post")),
    ]
    try:
        optimizer.step(_loss_closure(optimizer, weight, bias, input))
    finally:
        for handle in handles:
            handle.remove()
    optimizer.step(_loss_closure(optimizer, weight, bias, input))
    assert calls == ["global pre", "pre", "post", "global post"]


@by_name
def test_state_dict_hooks(info):
    """state_dict and load_state_dict pre/post hooks run, and what they return is used."""
    weight, bias, input = _linear()
    optimizer = info.optim_cls([weight, bias], **_inputs(info)[0].kwargs)
    optimizer.step(_loss_closure(optimizer, weight, bias, input))
    calls: list[str] = []
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("save pre"))

    def save_post(opt, state_dict):
        calls.append("save post")
        state_dict["param_groups"][0]["lr"] = 0.5
        return state_dict

    optimizer.register_state_dict_post_hook(save_post)
    state_dict = optimizer.state_dict()
    assert state_dict["param_groups"][0]["lr"] == 0.5
    other = info.optim_cls([weight, bias], **_inputs(info)[0].kwargs)

    def load_pre(opt, state_dict):
        calls.append("load pre")
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.25
        return state_dict

    other.register_load_state_dict_pre_hook(load_pre)
    other.register_load_state_dict_post_hook(lambda opt: calls.append(f"load post lr={opt.param_groups[0]['lr']}"))
    other.load_state_dict(state_dict)
    assert calls == ["save pre", "save post", "load pre", "load post lr=0.25"]


@by_name
def test_state_is_filled_and_grads_are_never_written(info):
    """After a step every param with a gradient has its state; the gradients are left as they were."""
    for optim_input in _inputs(info):
        weight, bias, input = _linear(seed=6)
        optimizer = info.optim_cls([weight, bias], **optim_input.kwargs)
        closure = _loss_closure(optimizer, weight, bias, input)
        for _ in range(2):
            closure()
            grads = [weight.grad.clone(), bias.grad.clone()]
            optimizer.step()
            _assert_same([weight.grad, bias.grad], grads, optim_input.desc)
        for p in (weight, bias):
            assert optimizer.state[p] and optimizer.state[p]["step"].item() == 2, optim_input.desc


@by_name
def test_mixed_dtypes(info):
    """fp32 and bf16 params in one group step as in two groups of one dtype each (same slots)."""
    for optim_input in _inputs(info):
        together = [Parameter(torch.randn(4, 3)), Parameter(torch.randn(6).to(torch.bfloat16))]
        apart = [Parameter(p.detach().clone()) for p in together]
        grads = [torch.randn_like(p) for p in together]
        optimizer = info.optim_cls(together, **optim_input.kwargs)
        separate = info.optim_cls([{"params": [p]} for p in apart], **optim_input.kwargs)
        for _ in range(3):
            for p, q, g in zip(together, apart, grads):
                p.grad, q.grad = g.clone(), g.clone()
            optimizer.step()
            separate.step()
        _assert_same([p.detach() for p in together], [p.detach() for p in apart], optim_input.desc)
