"""Every op on every fast backend against the reference: odd sizes, views, both unit kinds.

Results are bit-identical (each backend rounds every operation as the reference does);
masks from the two backends' own probabilities are compared wherever |U - pi| > 1e-6.
"""

import pytest
import torch

from fastmask import ops
from fastmask.reference.philox import uniform
from tests.conftest import DEVICE, FAST_BACKENDS, INTERPRETED
from tests.oracles import gumbel_top_k

pytestmark = pytest.mark.skipif(not FAST_BACKENDS, reason="no fast backend can run here")

SIZES = [1, 127, 4097, 2**20 + 3]


def _rand(shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _skip_interpreted_half(backend, dtype):
    if backend == "triton" and INTERPRETED and dtype != torch.float32:
        pytest.skip("bf16/fp16 loads are unreliable in the Triton interpreter; run on a GPU")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=["fp32", "bf16", "fp16"])
def test_fisher_update(backend, n, dtype):
    _skip_interpreted_half(backend, dtype)
    f, g = _rand(n).abs(), _rand(n, 1, dtype)
    expected = ops.fisher_update_(f.clone(), g, 0.9, backend="torch")
    assert torch.equal(ops.fisher_update_(f, g, 0.9, backend=backend), expected)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fisher_update_noncontiguous(backend):
    f, g = _rand((6, 5)).abs().t(), _rand((6, 5), 1).t()
    expected = ops.fisher_update_(f.clone(), g, 0.5, backend="torch")
    out = ops.fisher_update_(f, g, 0.5, backend=backend)
    assert out is f
    assert torch.equal(f, expected)


def _agree_off_boundary(mask, ref_mask, u, pi):
    decided = (u - pi).abs() > 1e-6
    assert torch.equal(mask[decided], ref_mask[decided])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("sampling", ["poisson", "uniform"])
def test_probs_and_mask_elements(backend, n, sampling):
    s = _rand(n) ** 2
    pi_ref = ops.inclusion_probs(s, 0.3, sampling=sampling, min_prob=0.01, backend="torch")
    pi = ops.inclusion_probs(s, 0.3, sampling=sampling, min_prob=0.01, backend=backend)
    assert torch.equal(pi, pi_ref)
    stream = (3 << 32) | 17
    mask = ops.sample_mask(pi, seed=2**63 + 5, stream=stream, backend=backend)
    ref_mask = ops.sample_mask(pi, seed=2**63 + 5, stream=stream, backend="torch")
    assert torch.equal(mask, ref_mask)  # same pi in: the masks are the same function of U
    _agree_off_boundary(
        mask.cpu(), ops.sample_mask(pi_ref, seed=2**63 + 5, stream=stream, backend="torch").cpu(),
        uniform(2**63 + 5, stream, n), pi.cpu())


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_probs_and_mask_rows_and_views(backend):
    s = (_rand((9, 4, 5)) ** 2).transpose(1, 2)  # non-contiguous view
    pi = ops.inclusion_probs(s, 0.5, granularity="row", backend=backend)
    assert torch.equal(pi, ops.inclusion_probs(s, 0.5, granularity="row", backend="torch"))
    stream = torch.tensor(77, device=DEVICE)
    mask = ops.sample_mask(pi, seed=4, stream=stream, granularity="row", backend=backend)
    assert torch.equal(mask, ops.sample_mask(pi, seed=4, stream=stream, granularity="row", backend="torch"))


@pytest.mark.parametrize("backend", ["torch", *FAST_BACKENDS])
@pytest.mark.parametrize("granularity", ["element", "row"])
def test_sample_exact(backend, granularity):
    """Against an independent oracle (tests/oracles.py): the cpp backend's exact sampling is the
    reference's code on the CPU, so comparing the two would prove nothing."""
    s = _rand((40, 7)) ** 2
    s[3] = 0  # zero-weight units
    units = s.sum(dim=1) if granularity == "row" else s.reshape(-1)
    u = uniform(9, 5, units.numel(), torch.device("cpu"))
    for k in (1, 13, 40):
        mask = ops.sample_exact(s, k, seed=9, stream=5, granularity=granularity, backend=backend)
        expected = gumbel_top_k(units.cpu(), k, u)
        if granularity == "row":
            expected = expected[:, None].expand(s.shape)
        assert torch.equal(mask.cpu(), expected.reshape(s.shape))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=["fp32", "bf16", "fp16"])
def test_unbiased_rescale(backend, n, dtype):
    _skip_interpreted_half(backend, dtype)
    g = _rand(n, 0, dtype)
    x = g.float()
    pi = ops.inclusion_probs(x * x, 0.4, min_prob=0.05)
    mask = ops.sample_mask(pi, seed=1)
    out = ops.unbiased_rescale(g, mask, pi, backend=backend)
    assert out.dtype == dtype and torch.equal(out, ops.unbiased_rescale(g, mask, pi, backend="torch"))


@pytest.mark.skipif(INTERPRETED, reason="torch.compile of Triton ops needs a GPU (the interpreter cannot trace)")
@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b == "triton"])
def test_ops_compile_without_graph_breaks(backend):
    def f(s, g):
        pi = ops.inclusion_probs(s, 0.3, backend=backend)
        return ops.unbiased_rescale(g, ops.sample_mask(pi, seed=3, stream=torch.tensor(2, device=g.device),
                                                       backend=backend), pi, backend=backend)

    s, g = _rand(4097) ** 2, _rand(4097, 1)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(s, g), f(s, g))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU with > 12 GB free")
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_more_than_2_31_elements(backend):
    n = 2**31 + 4099
    pi = torch.full((n,), 0.5, device=DEVICE)
    mask = ops.sample_mask(pi, seed=6, stream=1, backend=backend)
    tail = torch.arange(n - 4096, n, device=DEVICE)
    expected = uniform(6, 1, 4096, DEVICE, start=n - 4096) < 0.5
    assert torch.equal(mask[tail], expected)
