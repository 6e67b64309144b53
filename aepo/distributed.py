"""Collectives on a device their backend can reduce: nccl takes CUDA tensors only, so a host
tensor (a metric, a token count, the preemption or non-finite flag) is reduced on the current
CUDA device and copied back; gloo or a ``cpu:gloo,cuda:nccl`` group reduces it where it is.
Imports torch only: the kernels, the objectives and the trainer share it."""

from __future__ import annotations

import torch
import torch.distributed as dist


def backend_devices(group: dist.ProcessGroup | None = None) -> tuple[str, ...]:
    """Device types ``group``'s backends reduce on (the default group's when None):
    ("cpu", "cuda") for gloo and for ``cpu:gloo,cuda:nccl``, ("cuda",) for nccl."""
    config = dist.get_backend_config(group)  # "cuda:nccl", "cpu:gloo,cuda:nccl", ...
    return tuple(pair.split(":")[0] for pair in config.split(","))


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a host tensor goes for a collective over ``group``: the CPU when one of the
    group's backends takes CPU tensors, else the current device of its first accelerator
    (``cuda:<current>`` for nccl; set it with ``torch.cuda.set_device`` per rank)."""
    devices = backend_devices(group)
    if "cpu" in devices:
        return torch.device("cpu")
    kind = devices[0]
    return torch.device(kind, getattr(torch, kind).current_device())


def all_reduce(
    tensor: torch.Tensor,
    op: dist.ReduceOp | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """``dist.all_reduce`` (``op`` SUM by default) of ``tensor`` in place, on any device.

    A tensor on a device the group's backends take is reduced where it is; any other (a CPU
    tensor under nccl) is copied to :func:`collective_device`, reduced there and copied back:
    one device round trip of ``tensor.numel()`` elements. Returns ``tensor``, unchanged without
    torch.distributed or on one rank. Collective: every rank of ``group`` must call it.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    op = dist.ReduceOp.SUM if op is None else op
    if tensor.device.type in backend_devices(group):
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    moved = tensor.to(collective_device(group))
    dist.all_reduce(moved, op=op, group=group)
    return tensor.copy_(moved)


def mean_over_ranks(
    values: dict[str, float], group: dist.ProcessGroup | None = None
) -> dict[str, float]:
    """Each value averaged over the ranks of ``group`` in one fp64 all-reduce (every rank must
    pass the same keys); ``values`` itself without torch.distributed or on one rank."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return values
    keys = sorted(values)
    total = all_reduce(torch.tensor([values[k] for k in keys], dtype=torch.float64), group=group)
    world = dist.get_world_size(group)
    return {k: float(v) / world for k, v in zip(keys, total, strict=True)}
