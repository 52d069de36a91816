"""Every fast backend against the reference (the torch backend) over 10 optimizer steps.

fp32 params and states are bit-identical: every backend rounds each operation as the
reference does (IEEE division and sqrt, no FMA contraction, S summed in fp64 and rounded
once). OGM-GE noise goes through log/cos/sqrt, whose last bit differs between math
libraries: there parameters agree within 1e-6 of each tensor's scale. Selections (the
stats' selected-unit counts) are identical everywhere.
"""

import pytest
import torch

import fastmask
from tests.config import BACKEND_CONFIGS, TOLERANCE, OptimizerConfig
from tests.conftest import DEVICE, FAST_BACKENDS, INTERPRETED
from tests.optim.models import assert_close_to_scale, batches, flat_params, loss_of, make_model

pytestmark = pytest.mark.skipif(not FAST_BACKENDS, reason="no fast backend can run here")

CONFIGS = {name: (c.cls, c.kwargs) for name, c in BACKEND_CONFIGS.items()}


def _settings(cls):
    return OptimizerConfig(cls).settings()


def _run(backend, cls, kwargs, steps=10, dtype=torch.float32, **step_kwargs):
    model = make_model(dtype=dtype).to(DEVICE)
    kwargs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    opt = cls(model.groups(), seed=11, backend=backend, **kwargs)
    for batch in batches(steps, dtype=dtype):
        opt.zero_grad()
        loss_of(model, [x.to(DEVICE) for x in batch]).backward()
        opt.step(**_settings(cls), **step_kwargs)
    return model, opt


def _selected(opt):
    return {m: (s["realised_fraction"], s["units"], s["skipped_tensors"]) for m, s in opt.stats().items()}


def _steps_like_reference(run, backend, states=False):
    """``run(b)`` -> (params, optimizer) on backend ``b``: ``backend``'s params (and with ``states``
    every state tensor) equal the reference's bit for bit, as do its selections; returns its run."""
    ref, ref_opt = run("torch")
    out, opt = run(backend)
    for a, b in zip(ref, out):
        assert torch.equal(a, b)
        for key, value in ref_opt.state[a].items() if states else ():
            assert torch.equal(opt.state[b][key].cpu(), value.cpu()), key
    assert _selected(opt) == _selected(ref_opt)
    return out, opt


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(backend, name):
    cls, kwargs = CONFIGS[name]
    ref_model, ref = _run("torch", cls, kwargs)
    model, opt = _run(backend, cls, kwargs)
    assert _selected(opt) == _selected(ref)
    exact = BACKEND_CONFIGS[name].exact
    for (name, p_ref), p in zip(ref_model.named_parameters(), model.parameters()):
        if exact:
            assert torch.equal(p.detach().cpu(), p_ref.detach().cpu()), name
        else:
            assert_close_to_scale(p, p_ref, TOLERANCE["backend_ge_params"], name)
        for key, value in ref.state[p_ref].items():
            if exact:
                assert torch.equal(opt.state[p][key].cpu(), value.cpu()), f"{name} {key}"
            else:
                assert_close_to_scale(opt.state[p][key], value, TOLERANCE["backend_ge_states"], f"{name} {key}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_grad_scale_found_inf_and_nonfinite(backend):
    cls, kwargs = CONFIGS["amss+-adamw-ema"]
    runs = {}
    for b in ("torch", backend):
        model, opt = _run(b, cls, kwargs, steps=3, grad_scale=torch.tensor(4.0, device=DEVICE))
        before = flat_params(model)
        opt.zero_grad()
        loss_of(model, [x.to(DEVICE) for x in batches(1, seed=5)[0]]).backward()
        model.visual[0].weight.grad[0, 0, 0, 0] = float("inf")
        opt.step(ratios={"audio": 0.5}, found_inf=torch.tensor(1.0, device=DEVICE))
        assert torch.equal(flat_params(model), before)
        opt.step(ratios={"audio": 0.5})
        assert torch.isfinite(flat_params(model)).all()
        runs[b] = (model, opt)
    assert torch.equal(flat_params(runs[backend][0]), flat_params(runs["torch"][0]))
    assert _selected(runs[backend][1]) == _selected(runs["torch"][1])
    assert runs[backend][1].stats()["visual"]["skipped_tensors"] == 1


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("name", ["amss+-adamw-grad2", "amss+-row-legacy-ema", "amss+-zero-grad-maximize"])
@pytest.mark.parametrize("grad_scale", [0.25, 3.0])
def test_grad_scales_with_and_without_an_exact_reciprocal(backend, name, grad_scale):
    """g / grad_scale, bit for bit: a power of two (GradScaler's scales) and a scale whose
    reciprocal is inexact (the cpp step multiplies by 1 / scale only when that is exact)."""
    cls, kwargs = CONFIGS[name]
    scale = torch.tensor(grad_scale, device=DEVICE)
    ref_model, ref = _run("torch", cls, kwargs, steps=3, grad_scale=scale)
    model, opt = _run(backend, cls, kwargs, steps=3, grad_scale=scale)
    assert _selected(opt) == _selected(ref)
    assert torch.equal(flat_params(model), flat_params(ref_model))
    for p, p_ref in zip(model.parameters(), ref_model.parameters()):
        assert all(torch.equal(opt.state[p][k].cpu(), v.cpu()) for k, v in ref.state[p_ref].items())


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("granularity", ["element", "row"])
def test_many_small_noncontiguous_and_empty_tensors(backend, granularity):
    def run(b):
        gen = torch.Generator().manual_seed(0)
        shapes = [(3, 5), (1,), (), (0, 4), (7, 2, 3), (33,), (4, 3, 3, 3)] * 4
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in shapes]
        params[-1] = torch.nn.Parameter(params[-1].detach().to(memory_format=torch.channels_last))
        opt = fastmask.AMSSPlus([{"params": params, "modality": "m"}], lr=0.1, seed=2, backend=b,
                                granularity=granularity)
        for step in range(3):
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=gen).to(DEVICE)
                p.grad = g.to(memory_format=torch.channels_last) if p.dim() == 4 else g
            opt.step(ratios={"m": 0.4})
        return params, opt

    out, _ = _steps_like_reference(run, backend)
    assert out[-1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif("cpp" not in FAST_BACKENDS or DEVICE.type != "cpu", reason="the cpp backend's thread split")
@pytest.mark.parametrize("granularity", ["element", "row"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpp_split_between_threads_by_elements(granularity, threads):
    """A batch of small tensors beside chunks of large ones, ending in tensors of empty rows:
    the cpp step splits its chunks between threads by their elements, every chunk exactly once,
    whatever the thread count, and matches the reference bit for bit. (The empty rows' items have
    nothing to update; what they write, zero importances, a fresh buffer mostly holds already, so
    this test cannot tell whether a thread took them.)"""
    def run(b):
        gen = torch.Generator().manual_seed(1)
        shapes = [(8,), (3, 3), (300, 100), (16,), (40000,), (64, 5), (5, 0), (2, 0, 3)]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = fastmask.AMSSPlus([{"params": params, "modality": "m"}], lr=0.1, seed=3, backend=b,
                                granularity=granularity)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step(ratios={"m": 0.4})
        return params, opt

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, opt = run("cpp")
    finally:
        torch.set_num_threads(previous)
    ref, ref_opt = run("torch")
    for a, b in zip(ref, out):
        assert torch.equal(a, b)
    assert _selected(opt) == _selected(ref_opt)
    assert [opt.state[p]["step"].item() for p in out] == [2.0] * len(out)


# Each setting that takes a sampled tensor off the cpp step's plain element loop (plain_sampling in
# csrc/cpu/masked_step.cpp), and the plain loop itself (AdamW with decoupled decay, frozen units).
SAMPLING_LOOP_CASES = {
    "plain": dict(weight_decay=0.01),
    "adam-l2": dict(base="adam", weight_decay=0.01),
    "sgd-l2": dict(base="sgd", momentum=0.9, weight_decay=0.01),
    "sgd-plain": dict(base="sgd", momentum=0.9),
    "zero-grad": dict(masked="zero_grad"),
    "uniform": dict(sampling="uniform"),
    "legacy": dict(rescale="legacy"),
}


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("name", list(SAMPLING_LOOP_CASES))
def test_element_sampling_with_and_without_its_optional_terms(backend, name):
    """Element-unit AMSS+ with each optional term of the sampled update on or off, beside a tensor
    whose grads are all zero (its importance sum is 0: sampled at the ratio, not by the water
    level), bit for bit against the reference: the cpp step runs these on its plain element loop
    (the optional terms compiled out) or its general one, and must choose right."""
    def run(b):
        gen = torch.Generator().manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in ((300, 7), (50,), (9, 4))]
        opt = fastmask.AMSSPlus([{"params": params, "modality": "m"}], lr=0.05, seed=5, backend=b,
                                **SAMPLING_LOOP_CASES[name])
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            params[1].grad.zero_()
            opt.step(ratios={"m": 0.4})
        return params, opt

    _steps_like_reference(run, backend, states=True)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params(backend, dtype):
    tol = TOLERANCE[dtype]
    if backend == "triton" and INTERPRETED:
        pytest.skip("bf16/fp16 loads are unreliable in the Triton interpreter; run on a GPU")
    cls, kwargs = CONFIGS["amss+-adamw-grad2"]
    ref_model, ref = _run("torch", cls, kwargs, dtype=dtype)
    model, opt = _run(backend, cls, kwargs, dtype=dtype)
    torch.testing.assert_close(flat_params(model), flat_params(ref_model), rtol=tol, atol=tol)
    # exact: every param took all 10 steps (a missing step would hide inside the tolerance)
    steps = [opt.state[p]["step"].item() for p in model.parameters()]
    assert steps == [ref.state[p]["step"].item() for p in ref_model.parameters()] == [10.0] * len(steps)
    assert {m: s["units"] for m, s in opt.stats().items()} == {m: s["units"] for m, s in ref.stats().items()}


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU with > 20 GB free (64-bit indexing)")
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_step_on_more_than_2_31_elements(backend):
    from fastmask.reference.philox import rng_stream, uniform

    n = 2**31 + 4099
    p = torch.nn.Parameter(torch.zeros(n, device=DEVICE))
    p.grad = torch.ones(n, device=DEVICE)  # equal importance: pi = 0.5 everywhere
    opt = fastmask.AMSSPlus([{"params": [p], "modality": "m"}], base="sgd", lr=1.0, seed=3, backend=backend)
    opt.step(ratios={"m": 0.5})
    tail = p.detach()[-4096:]
    u = uniform(3, rng_stream(1, 0), 4096, DEVICE, start=n - 4096)  # the global element index
    assert torch.equal(tail, torch.where(u < 0.5, -2.0, 0.0))  # selected: -lr * g / pi


TENSOR_SETTING_CASES = {
    "amss+-element": (fastmask.AMSSPlus, dict(lr=1e-2), {"audio": 0.3, "visual": 1.0}),
    "amss+-row-legacy": (fastmask.AMSSPlus, dict(lr=1e-2, granularity="row", rescale="legacy"),
                         {"audio": 0.3, "visual": 1.0}),
    "amss+-exact-legacy": (fastmask.AMSSPlus, dict(lr=1e-2, sampling="exact", rescale="legacy"),
                           {"audio": 0.5, "visual": 1.0}),
    "ogm-ge-update": (fastmask.OGM, dict(lr=1e-2, ge=True, modulate="update"), {"audio": 0.4, "visual": 1.0}),
}


@pytest.mark.parametrize("backend", ["torch"] + FAST_BACKENDS)
@pytest.mark.parametrize("name", list(TENSOR_SETTING_CASES))
def test_tensor_settings_step_exactly_as_floats(backend, name):
    """Ratios / coefficients given as 0-d device tensors are read by the kernels from memory,
    and 1 (decided on the device) is the base optimizer, exactly as the float 1 the host sees."""
    cls, kwargs, values = TENSOR_SETTING_CASES[name]
    runs = []
    for as_tensor in (False, True):
        model = make_model().to(DEVICE)
        opt = cls(model.groups(), seed=5, backend=backend, **kwargs)
        settings = {m: torch.tensor(v, device=DEVICE) if as_tensor else v for m, v in values.items()}
        for batch in batches(4):
            opt.zero_grad()
            loss_of(model, [x.to(DEVICE) for x in batch]).backward()
            opt.step(**{cls.SETTING: settings})
        runs.append((model, opt))
    (float_model, float_opt), (tensor_model, tensor_opt) = runs
    assert torch.equal(flat_params(tensor_model), flat_params(float_model))
    assert _selected(tensor_opt) == _selected(float_opt)
    assert isinstance(tensor_opt.param_groups[0][cls.SETTING_LABEL], torch.Tensor)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU (CUDA sync debug mode)")
@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b != "cpp"])
def test_device_ratios_cause_no_host_sync(backend):
    model = make_model().to(DEVICE)
    opt = fastmask.AMSSPlus(model.groups(), lr=1e-2, seed=5, backend=backend)
    ratios = {"audio": torch.tensor(0.3, device=DEVICE), "visual": torch.tensor(0.7, device=DEVICE)}
    data = [[x.to(DEVICE) for x in batch] for batch in batches(3)]
    for batch in data[:2]:  # the first steps build and cache the pointer tables
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step(ratios=ratios)
    opt.zero_grad()
    loss_of(model, data[2]).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ratios["audio"].fill_(0.4)  # a new value, still no host read
        opt.step(ratios=ratios)
    finally:
        torch.cuda.set_sync_debug_mode("default")
