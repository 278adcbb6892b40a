"""Gradient cache (GradCache, Gao et al. 2021, arXiv 2101.06983): big contrastive batches in small memory.

A contrastive loss couples every example of the batch, so the batch must be embedded at once, and
activation memory grows with it. The gradient cache splits the work:

1. embed every chunk without building a graph (remembering each chunk's RNG state);
2. compute the loss on the full (optionally cross-device) batch of embeddings and its gradient with
   respect to the embeddings only: this is cheap, the "cache";
3. re-run each chunk with a graph, replaying its RNG state so dropout masks are the same, and
   back-propagate the cached gradient into the parameters.

The parameter gradients equal those of the full batch with the same dropout masks, while peak
activation memory is that of one chunk. The cost is one extra forward pass without graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ember_train.data.batching import split_batch
from ember_train.training.distributed import global_count


@dataclass
class StepContext:
    """What a loss step that runs its own backward passes needs from the training loop.

    ``backward(t)`` back-propagates ``t`` scaled for gradient accumulation (and by the fp16 loss
    scaler); ``no_sync()`` suspends DDP's all-reduce; ``sync`` says whether this micro-step's
    gradients must be all-reduced; ``may_backward(loss)`` says whether to back-propagate the
    loss at all (False only for a non-finite loss under DeepSpeed, agreed across processes).
    """

    backward: Callable[[torch.Tensor], None]
    no_sync: Callable[[], object]
    sync: bool
    may_backward: Callable[[torch.Tensor], bool]


class _RNGState:
    """CPU (and CUDA, when used) RNG state, to replay a chunk's dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def grad_cache_step(
    model: nn.Module,
    inputs: Sequence[dict[str, torch.Tensor]],
    loss_from_embeddings: Callable[[list[torch.Tensor]], torch.Tensor],
    ctx: StepContext,
    chunk_size: int,
) -> torch.Tensor:
    """Run one micro-step with the gradient cache; returns the (detached) loss.

    ``inputs`` are tokenized groups (e.g. queries, documents); ``loss_from_embeddings`` maps
    their embeddings, in the same order, to the loss (it may gather across processes).
    """
    device = next(model.parameters()).device
    chunked = [split_batch(features, chunk_size) for features in inputs]

    # 1. Embeddings without graph; remember each chunk's RNG state.
    states: list[list[_RNGState]] = []
    embeddings: list[torch.Tensor] = []
    with torch.no_grad():
        for group in chunked:
            group_states, group_embeddings = [], []
            for chunk in group:
                group_states.append(_RNGState(device))
                group_embeddings.append(model(chunk))
            states.append(group_states)
            embeddings.append(torch.cat(group_embeddings))
    rng_after = _RNGState(device)

    # 2. Loss on the whole batch, gradient with respect to the embeddings only.
    leaves = [e.detach().requires_grad_() for e in embeddings]
    loss = loss_from_embeddings(leaves)
    if not ctx.may_backward(loss.detach()):
        return loss.detach()
    cached = torch.autograd.grad(loss, leaves)

    # 3. Replay each chunk with a graph and push the cached gradient into the parameters.
    # Only the very last backward of a syncing micro-step all-reduces (DDP); the rest accumulate.
    jobs = [(g, c) for g in range(len(chunked)) for c in range(len(chunked[g]))]
    total = global_count(len(jobs), device, op=dist.ReduceOp.MAX)
    for job in range(total):
        last = job == total - 1
        # A process with fewer chunks (a smaller last batch) replays its last chunk with a zero
        # gradient: DeepSpeed reduces at every backward, so all processes must run as many.
        g, c = jobs[min(job, len(jobs) - 1)]
        states[g][c].restore()
        with ctx.no_sync() if not (last and ctx.sync) else nullcontext():
            output = model(chunked[g][c])
            start = c * chunk_size
            grad = cached[g][start : start + output.shape[0]].to(output.dtype)
            ctx.backward((output * (grad if job < len(jobs) else torch.zeros_like(grad))).sum())
    rng_after.restore()  # continue the RNG stream as if the chunks had run once
    return loss.detach()


def slices_loss_step(
    slices_of: Callable[[Any], list[dict[str, torch.Tensor]]],
    loss_from_embeddings: Callable[[list[torch.Tensor], Any], torch.Tensor],
    counts: Callable[[Any], dict[str, float]],
    grad_cache_chunk_size: int = 0,
) -> Callable:
    """A loss step over a batch's length-sorted slices, plain or through the gradient cache.

    ``slices_of(batch)`` are the forward inputs; ``loss_from_embeddings(embeddings, batch)`` maps
    their embeddings (one tensor per slice, in order) to the loss; ``counts(batch)`` are the step's
    metrics. With ``grad_cache_chunk_size > 0`` the step is ``(model, batch, ctx)`` and runs its own
    backward passes (:func:`grad_cache_step`; the loop is told so by ``backward_in_step``).
    """

    def loss_step(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        embeddings = [model(s) for s in slices_of(batch)]
        return loss_from_embeddings(embeddings, batch), counts(batch)

    def cached_loss_step(
        model: nn.Module, batch: Any, ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = grad_cache_step(
            model,
            slices_of(batch),
            lambda embeddings: loss_from_embeddings(embeddings, batch),
            ctx,
            grad_cache_chunk_size,
        )
        return loss, counts(batch)

    return cached_loss_step if grad_cache_chunk_size > 0 else loss_step
