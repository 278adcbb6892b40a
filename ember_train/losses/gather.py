"""Gather embeddings from every process while keeping gradients exact.

``all_gather`` has no gradient. For in-batch negatives across devices, the loss on every
process depends on this process's embeddings, so the gradient of the *sum* of all processes'
losses must flow back to the local slice. The backward pass therefore all-reduces the gradient
of the gathered tensor and keeps the local rows. Works with gloo (CPU) and NCCL, and with
processes holding different numbers of rows (the last batch of an epoch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


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
