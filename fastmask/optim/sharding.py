"""FSDP2 / DTensor parameters: the step runs on local shards with full-tensor semantics.

A sharded parameter (a ``DTensor`` whose placements are ``Shard(0)`` on one mesh
dimension and ``Replicate()`` on the others, what ``fully_shard`` produces) is
stepped on its local shard. Its random numbers are indexed by the full tensor's unit
index and its N, S, GE std and non-finite skip are the full tensor's: the pass-1 sums
of a batch's sharded tensors are all-reduced over their shard group in one collective
per step (one per process group, when a batch mixes meshes). So the masks and
parameters equal those of an unsharded run, on any number of ranks.
"""

from __future__ import annotations

import torch

from ..reference.spec import Shard

_SHARD_HELP = "fastmask steps DTensor params placed as Shard(0) and/or Replicate() (what FSDP2's fully_shard makes)"


_TYPES: tuple | None = None


def _dtensor_types() -> tuple | None:
    """(DTensor, Replicate, Shard), imported once; None without torch.distributed."""
    global _TYPES
    if _TYPES is None and torch.distributed.is_available():
        from torch.distributed.tensor import DTensor, Replicate
        from torch.distributed.tensor import Shard as ShardPlacement

        _TYPES = (DTensor, Replicate, ShardPlacement)
    return _TYPES


def is_dtensor(x: object) -> bool:
    types = _dtensor_types()
    return types is not None and isinstance(x, types[0])


def shard_mesh_dim(p: torch.Tensor, name: str) -> int | None:
    """The mesh dimension over which ``p`` is split on dim 0, or None (replicated);
    raises for placements fastmask cannot step shard-locally."""
    _, replicate, shard_placement = _dtensor_types()
    mesh_dim = None
    for d, placement in enumerate(p.placements):
        if type(placement) is replicate:
            continue
        if type(placement) is shard_placement and placement.dim == 0 and mesh_dim is None:
            mesh_dim = d
            continue
        raise NotImplementedError(f"{name} is a DTensor placed as {tuple(p.placements)}; {_SHARD_HELP}")
    return mesh_dim


def check_steppable(p: torch.Tensor, group: dict, name: str) -> None:
    """Raise, before anything is written, if ``p`` (any param) cannot be stepped shard-locally
    with ``group``'s settings: exact sampling needs every unit of a tensor on one rank."""
    if group.get("sampling") == "exact" and is_dtensor(p) and shard_mesh_dim(p, name) is not None:
        raise NotImplementedError(
            f"{name}: sampling='exact' needs every unit of a tensor on one rank, and this param is sharded; "
            f"use sampling='poisson' or 'uniform' with FSDP2/DTensor"
        )


def local_tensors(p: torch.Tensor, state: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor], Shard | None, object]:
    """What the step reads of ``p`` and its ``state``: (param, grad, state, its Shard, the shard
    process group); for a DTensor the local views (its ``step`` stays a plain tensor), else
    ``p`` itself with no shard."""
    if not is_dtensor(p):
        return p, p.grad, state, None, None
    param, grad, shard, process_group = local_shard(p, "a DTensor param")
    local = {k: v if k == "step" else v.to_local() for k, v in state.items()}
    return param, grad, local, shard, process_group


def local_shard(p: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None, Shard | None, object]:
    """(local param, local grad, its Shard or None, the shard process group or None).

    The local tensors are views of the DTensors' storage: the step writes through them.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = p.to_local()
    grad = p.grad.to_local() if p.grad is not None else None
    mesh_dim = shard_mesh_dim(p, name)
    if mesh_dim is None:
        return local, grad, None, None
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(shape) != tuple(local.shape):
        raise RuntimeError(f"{name}: local shard has shape {tuple(local.shape)}, DTensor expects {tuple(shape)}")
    row_numel = p.shape[1:].numel()
    return local, grad, Shard(p.shape, offset[0] * row_numel), p.device_mesh.get_group(mesh_dim)


def all_reduce_sums(sums: torch.Tensor, process_groups: list[object]) -> None:
    """Sum, in place, row i of a batch's pass-1 ``sums`` (float64 [T, 4]) over
    ``process_groups[i]``, the group tensor i is sharded over (None: a whole tensor, left
    as it is): one all-reduce per distinct process group."""
    by_group: dict[int, tuple[object, list[int]]] = {}
    for i, pg in enumerate(process_groups):
        if pg is not None:
            by_group.setdefault(id(pg), (pg, []))[1].append(i)
    for pg, rows in by_group.values():
        index = torch.tensor(rows, device=sums.device)
        block = sums.index_select(0, index)
        torch.distributed.all_reduce(block, group=pg)
        sums.index_copy_(0, index, block)


def load_state_tensor(p: torch.Tensor, value: torch.Tensor, name: str) -> torch.Tensor:
    """A checkpoint's state tensor for DTensor param ``p``, as an fp32 DTensor like ``p``.

    ``value`` is a DTensor with ``p``'s mesh and placements, or a plain tensor of the
    full shape (each rank keeps its own slice).
    """
    out = torch.zeros_like(p, dtype=torch.float32)
    if is_dtensor(value):
        if value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements):
            raise ValueError(f"{name} is a DTensor placed as {tuple(value.placements)}; its param is placed as "
                             f"{tuple(p.placements)}")
        out.to_local().copy_(value.to_local())
        return out
    local, _, shard, _ = local_shard(p, name)
    if shard is None:
        out.to_local().copy_(value)
    else:
        rows = shard.offset // max(p.shape[1:].numel(), 1)
        out.to_local().copy_(value.narrow(0, rows, local.shape[0]))
    return out
