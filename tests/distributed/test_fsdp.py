"""FSDP2 (fully_shard, gloo, CPU): the sharded step equals the unsharded one, bit for bit.

Each rank steps its local shards; the RNG is indexed by the full tensor's unit index and
S / N / the GE std / the non-finite skip are the full tensor's (one all-reduce of the
pass-1 sums per param group and step). Both ranks see the same batch, so FSDP's averaged
gradient ((g + g) / 2) is exactly the unsharded one and parameters must match exactly.
The shapes give shard offsets that are not multiples of 4 and a rank with an empty shard.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastmask
from tests.conftest import DEVICE, FAST_BACKENDS
from tests.config import BACKEND_CONFIGS, DISTRIBUTED_CONFIGS
from tests.optim.models import TwoTower

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
STEPS = 6
NAN_STEP = 3  # one rank's shard of audio.2.weight gets a NaN gradient at this step

class OddShapes(TwoTower):
    """TwoTower's forward and groups with row counts that split unevenly over 2 ranks: shard
    offsets 2, 14, 30 (not multiples of 4) and empty shards (visual.2 has one row)."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.audio = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
        self.visual = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 1))
        self.head = nn.Linear(4, 3)


def _model() -> OddShapes:
    torch.manual_seed(0)
    return OddShapes()


def _train(model, opt, step_kwargs, nan_at, count_reduces: bool) -> list[int]:
    """STEPS steps on a fixed batch stream; ``nan_at(model)`` poisons a gradient at NAN_STEP.
    Returns the number of all_reduce calls each ``opt.step`` made."""
    gen = torch.Generator().manual_seed(1)
    calls, real_all_reduce = [], dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls[-1] += 1
        return real_all_reduce(*args, **kwargs)

    for step in range(STEPS):
        a, v = torch.randn(8, 5, generator=gen), torch.randn(8, 6, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(a, v), y).backward()
        if step == NAN_STEP:
            nan_at(model)
        calls.append(0)
        if count_reduces:
            dist.all_reduce = counting_all_reduce
        try:
            opt.step(**step_kwargs)
        finally:
            dist.all_reduce = real_all_reduce
    return calls


def _same_states(opt, other) -> bool:
    """Every state tensor of ``opt`` equals ``other``'s (DTensors: the local shards)."""
    for p in opt.state:
        for key, value in opt.state[p].items():
            b = other.state[p][key]
            local = (lambda x: x.to_local() if hasattr(x, "to_local") else x)
            if not torch.equal(local(value), local(b)):
                return False
    return True


def _worker(rank: int, init_file: str, backend: str, out_dir: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for name in DISTRIBUTED_CONFIGS:
        config = BACKEND_CONFIGS[name]
        step_kwargs = config.settings()

        def make_opt(groups, backend, config=config):
            return config.build(groups, seed=7, backend=backend)

        sharded = _model()
        fully_shard(sharded, mesh=mesh)
        def poison_shard(model):  # audio.2.weight has 3 rows: rank 0 holds rows 0-1, rank 1 row 2
            if rank == 1:
                model.audio[2].weight.grad.to_local()[0, 0] = float("nan")

        opt = make_opt(sharded.groups(), backend)
        calls = _train(sharded, opt, step_kwargs, poison_shard, True)
        full = [p.full_tensor() for p in sharded.parameters()]

        plain = _model()

        def poison_full(model):
            model.audio[2].weight.grad[2, 0] = float("nan")

        plain_opt = make_opt(plain.groups(), backend)
        _train(plain, plain_opt, step_kwargs, poison_full, False)
        # checkpoints: the sharded state round-trips, and an unsharded checkpoint (full
        # tensors) loads into the sharded optimizer as each rank's slice
        reloaded, from_plain = make_opt(sharded.groups(), backend), make_opt(sharded.groups(), backend)
        reloaded.load_state_dict(opt.state_dict())
        from_plain.load_state_dict(plain_opt.state_dict())
        results[name] = {
            "equal": [torch.equal(f, p.detach()) for f, p in zip(full, plain.parameters())],
            "moved": not all(torch.equal(p.detach(), q) for p, q in zip(plain.parameters(), _model().parameters())),
            "calls": calls,
            "stats": opt.stats(),
            "plain_stats": plain_opt.stats(),
            "reloaded": _same_states(opt, reloaded) and _same_states(opt, from_plain),
        }
    from torch.distributed.tensor import Shard, distribute_tensor

    column_sharded = nn.Parameter(distribute_tensor(torch.zeros(4, 6), mesh, [Shard(1)]))
    try:
        fastmask.AMSSPlus([column_sharded])
        results["shard1_raised"] = False
    except NotImplementedError as exc:
        results["shard1_raised"] = "Shard(dim=1)" in str(exc)
    exact = fastmask.AMSS(sharded.groups(), sampling="exact", seed=1, backend=backend)
    try:
        exact.step(ratios={"audio": 0.5})
        results["exact_raised"] = False
    except NotImplementedError:
        results["exact_raised"] = not exact.state  # raised before anything was written
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    # The results are saved; skip interpreter finalization, where gloo's worker threads are
    # torn down and now and then abort the process ("terminate called without an active
    # exception", seen in 2 of ~10 full runs of this suite, never in the optimizer's step).
    os._exit(0)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="gloo FSDP2 on CPU tensors")
@pytest.mark.parametrize("backend", ["torch"] + [b for b in FAST_BACKENDS if b != "cuda"])
def test_fsdp2_equals_unsharded(backend, tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), backend, str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert results.pop("exact_raised"), "sampling='exact' on sharded params must raise before any write"
        assert results.pop("shard1_raised"), "a Shard(1) DTensor param must be refused, naming its placement"
        for name, r in results.items():
            assert all(r["equal"]), f"{name} rank {rank}: sharded params differ from the unsharded run: {r['equal']}"
            assert r["moved"], name
            # three param groups, each with sharded params: one all-reduce each, per step
            assert r["calls"] == [3] * STEPS, f"{name}: all_reduce calls per step {r['calls']}"
            # the NaN on rank 1's shard skips audio.2.weight on every rank, as unsharded
            assert r["plain_stats"]["audio"]["skipped_tensors"] == 1
            assert r["stats"]["audio"]["skipped_tensors"] == 1, name
            assert r["reloaded"], f"{name}: state_dict round trip"
        masked = results["amss+-adamw-ema"]["stats"]["audio"]
        assert masked["realised_fraction"] < 0.9, masked
