"""Gather embeddings from every process while keeping gradients exact.

``all_gather`` has no gradient. For in-batch negatives across devices, the loss on every
process depends on this process's embeddings, so the gradient of the *sum* of all processes'
losses must flow back to the local slice. The backward pass therefore all-reduces the gradient
of the gathered tensor and keeps the local rows. Works with gloo (CPU) and NCCL, and with
processes holding different numbers of rows (the last batch of an epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        rank = dist.get_rank()
        max_rows = max(sizes)
        padded = local.new_zeros((max_rows, *local.shape[1:]))
        padded[: local.shape[0]] = local
        chunks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(chunks, padded.contiguous())
        ctx.rank, ctx.sizes = rank, sizes
        return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_with_grad(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``local`` ``[n_r, ...]`` from every process in rank order.

    Returns the gathered tensor and the row offset of this process's slice in it. On one
    process it returns ``local`` and 0.
    """
    if not is_distributed():
        return local, 0
    n = torch.tensor([local.shape[0]], device=local.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes_list = torch.cat(sizes).tolist()  # one host read, whatever the world size
    offset = sum(sizes_list[: dist.get_rank()])
    return _GatherWithGrad.apply(local, sizes_list), offset


def map_sharded(fn: Callable[[list[T]], list[R]], items: Sequence[T]) -> list[R]:
    """``fn(items)`` (one result per item, in order), each process computing every N-th item.

    For per-item work that every process needs in full, such as the token lengths behind
    length-grouped batching: N processes each do 1/N of it and exchange the results
    (``all_gather_object``), instead of each doing all of it. On one process: ``fn(items)``.
    """
    if not is_distributed():
        return fn(list(items))
    world, rank = dist.get_world_size(), dist.get_rank()
    local = fn(list(items[rank::world]))
    shards: list[list[R] | None] = [None] * world
    dist.all_gather_object(shards, local)
    results: list[R] = [None] * len(items)  # type: ignore[list-item]
    for r, shard in enumerate(shards):
        results[r::world] = shard  # type: ignore[assignment]
    return results


def global_count(
    local_count: int, device: torch.device, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
) -> int:
    """Sum of ``local_count`` over processes (the global batch size); ``op=MAX``: the largest."""
    if not is_distributed():
        return local_count
    t = torch.tensor([local_count], device=device)
    dist.all_reduce(t, op=op)
    return int(t.item())


def cpu_process_group_kwargs() -> dict:
    """Arguments for ``Accelerator`` so that several processes on a machine without CUDA form a
    gloo process group; empty when there is one process or a GPU.

    accelerate only picks gloo (MULTI_CPU) when asked for the CPU explicitly, and
    ``accelerate launch --cpu`` starts a single process; so ``--multi_gpu --num_processes N`` on a
    CPU machine needs ``cpu=True``. Under DeepSpeed, ``cpu=True`` would silently turn DeepSpeed off
    (accelerate then trains plain DDP), so the backend is named instead and DeepSpeed's CPU
    accelerator runs on gloo.
    """
    import os

    from accelerate.utils import InitProcessGroupKwargs

    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}
