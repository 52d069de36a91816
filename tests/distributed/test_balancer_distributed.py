"""DDP and FSDP2 (gloo, CPU) with the balancer: ranks fed different local batches, with
differently seeded torch generators and ``seed=None``, stay bit-identical (DDP) and get the
same values, those of the pooled statistics (FSDP2).

Equal masks need equal seeds and equal ratios: the optimizer agrees on rank 0's seed, and the
balancer all-reduces its statistics before computing the ratios, so no rank uses values of
its own local batch. ``per_rank`` shows what happens without that (ratios from each rank's
batch, as the significance functions give them): the replicas drift apart.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastmask
from fastmask import significance as sig
from tests.optim.models import make_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
STEPS = 20


def _worker(rank: int, world: int, init_file: str, mode: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = make_model(seed=0)
    torch.manual_seed(1000 + rank)  # a common habit: each rank seeds its generator differently
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    groups = fastmask.modality_groups(model, {"audio": "audio", "visual": "visual"})
    balancer = None
    if mode == "balancer":
        balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
        opt = fastmask.AMSSPlus(groups, lr=1e-2, balancer=balancer)
    else:
        opt = fastmask.AMSSPlus(groups, lr=1e-2, seed=7)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees its own data
    for _ in range(STEPS):
        a, v = torch.randn(6, 1, 8, 8, generator=gen), torch.randn(6, 3, 8, 8, generator=gen)
        y = torch.randint(0, 5, (6,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(ddp(a, v), y)
        if balancer is not None:
            balancer.observe(y)
        loss.backward()
        if balancer is not None:
            opt.step()
        else:
            with torch.no_grad():
                feats = {"audio": model.audio(a), "visual": model.visual(v)}
                logits = sig.unimodal_logits(model.head, feats)
                opt.step(ratios=sig.amss_ratios(sig.mutual_information_rate(logits, y, feats)))
    torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    os._exit(0)  # skip gloo's teardown at interpreter exit (see test_ddp.py)


def _run(mode: str, tmp_path) -> list[list[torch.Tensor]]:
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), mode, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def test_ranks_stay_identical_with_the_balancer(tmp_path):
    params = _run("balancer", tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(params[0], params[1]))
    assert not all(torch.equal(a, b) for a, b in zip(params[0], make_model(seed=0).parameters()))


def test_per_rank_ratios_drift_apart(tmp_path):
    """The failure the balancer removes: same seed, but ratios from each rank's own batch."""
    params = _run("per_rank", tmp_path)
    differ = sum(int((a != b).sum()) for a, b in zip(params[0], params[1]))
    total = sum(a.numel() for a in params[0])
    print(f"per-rank ratios: {differ} of {total} parameter elements differ between the ranks")
    assert differ > total // 10


def _fsdp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed=0)
    torch.manual_seed(1000 + rank)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    opt = fastmask.AMSSPlus(fastmask.modality_groups(model, {"audio": "audio", "visual": "visual"}), lr=1e-2,
                            balancer=balancer)
    gen = torch.Generator().manual_seed(100 + rank)
    ratios, local = [], []
    for _ in range(5):
        a, v = torch.randn(6, 1, 8, 8, generator=gen), torch.randn(6, 3, 8, 8, generator=gen)
        y = torch.randint(0, 5, (6,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(a, v), y)
        balancer.observe(y)
        local.append(balancer._sums.clone())  # this rank's own statistics, before the all-reduce
        loss.backward()
        opt.step()
        ratios.append(torch.stack([opt.ratio("audio"), opt.ratio("visual")]))
    torch.save({"ratios": torch.stack(ratios), "local": torch.stack(local), "seed": opt.param_groups[0]["seed"]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    os._exit(0)


def test_fsdp2_ranks_get_the_same_values_from_pooled_statistics(tmp_path):
    world = 2
    mp.spawn(_fsdp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert runs[0]["seed"] == runs[1]["seed"]
    assert torch.equal(runs[0]["ratios"], runs[1]["ratios"])
    assert not torch.equal(runs[0]["local"], runs[1]["local"])  # the ranks saw different batches
    # the values of the pooled statistics: what one process seeing both batches computes
    rule = fastmask.Balancer({"audio": torch.nn.Identity(), "visual": torch.nn.Identity()}, torch.nn.Linear(16, 5))
    pooled = runs[0]["local"] + runs[1]["local"]
    assert torch.equal(torch.stack([rule._ratios(s) for s in pooled]).float(), runs[0]["ratios"])
