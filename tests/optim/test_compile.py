"""torch.compile and CUDA graphs: the fused step is one torch.library op node per batch, a
compiled step is bit-identical to eager, and ratios that change every step recompile nothing."""

import pytest
import torch

import fastmask
from tests.conftest import DEVICE, FAST_BACKENDS
from tests.optim.models import batches, flat_params, loss_of, make_model


class RecordingBackend:
    """A torch.compile backend that runs the captured graphs as they are (eager kernels, so
    results can be compared bit for bit) and records how many fastmask op nodes each holds."""

    def __init__(self) -> None:
        self.graphs: list[int] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> object:
        self.graphs.append(sum(str(n.target).startswith("fastmask.") for n in gm.graph.nodes))
        return gm.forward


def _train(backend: str, compiled: RecordingBackend | None, steps: int = 10):
    model = make_model().to(DEVICE)
    opt = fastmask.AMSSPlus(model.groups(), lr=torch.tensor(1e-2, device=DEVICE), seed=3, backend=backend,
                            importance="ema")
    ratios = {"audio": torch.tensor(0.3, device=DEVICE), "visual": torch.tensor(1.0, device=DEVICE)}
    step = torch.compile(opt.step, backend=compiled, fullgraph=True) if compiled else opt.step
    for i, batch in enumerate(batches(steps)):
        opt.zero_grad()
        loss_of(model, [x.to(DEVICE) for x in batch]).backward()
        ratios["audio"].fill_(0.2 + 0.05 * i)  # a new ratio every step, read on the device
        step(ratios=ratios)
    return model, opt


@pytest.mark.parametrize("backend", ["torch"] + [b for b in FAST_BACKENDS if b != "cuda"])
def test_compiled_step_is_op_nodes_and_bit_identical_to_eager(backend):
    torch._dynamo.reset()
    recorder = RecordingBackend()
    eager_model, eager_opt = _train(backend, None)
    model, opt = _train(backend, recorder)
    assert torch.equal(flat_params(model), flat_params(eager_model))
    assert opt.stats() == eager_opt.stats()
    # one graph when states are created, one for every later step: no recompilation as the
    # ratios change; each holds the step of the three param groups as three op nodes
    assert recorder.graphs == [3, 3]


def test_the_op_has_a_schema_with_its_mutations():
    schema = str(torch.ops.fastmask.masked_step_.default._schema)
    for mutated in ("params", "steps", "exp_avgs", "exp_avg_sqs", "momentum_buffers", "fishers"):
        assert f"Tensor(" in schema and f"!)[] {mutated}" in schema, mutated
    assert "Tensor[] grads" in schema and "Tensor(a7!)? stats" in schema


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b != "cpp"])
def test_cuda_graph_replay_is_bit_identical_to_eager(backend):
    data = [[x.to(DEVICE) for x in batch] for batch in batches(6)]

    def make():
        model = make_model().to(DEVICE)
        opt = fastmask.AMSSPlus(model.groups(), lr=torch.tensor(1e-2, device=DEVICE), seed=3, backend=backend)
        return model, opt

    ratios = {"audio": torch.tensor(0.3, device=DEVICE), "visual": torch.tensor(0.7, device=DEVICE)}
    eager_model, eager_opt = make()
    for batch in data:
        eager_opt.zero_grad(set_to_none=False)
        loss_of(eager_model, batch).backward()
        eager_opt.step(ratios=ratios)

    model, opt = make()
    for batch in data[:2]:  # warm-up on a side stream (states, cached tables), as CUDA graphs need
        opt.zero_grad(set_to_none=False)
        loss_of(model, batch).backward()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            opt.step(ratios=ratios)
        torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step(ratios=ratios)
    for batch in data[2:]:
        opt.zero_grad(set_to_none=False)
        loss_of(model, batch).backward()  # into the same .grad storage the graph reads
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(flat_params(model), flat_params(eager_model))


def test_float_settings_are_one_device_tensor_per_value():
    """What lets a captured step read its float settings from memory that outlives the capture."""
    from fastmask.reference.spec import StepConfig

    a, b = StepConfig(ratio=0.3).device_settings(DEVICE), StepConfig(ratio=0.3).device_settings(DEVICE)
    assert a is b and a.device.type == DEVICE.type and a.tolist() == pytest.approx([0.3, 1.0, 1.0])
    assert StepConfig(ratio=0.4).device_settings(DEVICE) is not a
