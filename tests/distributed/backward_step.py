"""One training step's backward for the 2-process check scripts: plain, or through the gradient cache."""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from accelerate import Accelerator

from ember_train.training.grad_cache import StepContext, grad_cache_step


def backward_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    features: list[dict],
    loss_from: Callable[..., torch.Tensor],
    chunk: int,
    around_loss: AbstractContextManager | None = None,
) -> torch.Tensor:
    """Embed each of ``features`` with ``model``, back-propagate ``loss_from(*embeddings)``; return it.

    ``chunk > 0`` goes through the gradient cache in chunks of that size; ``around_loss`` wraps the
    plain path's loss computation (e.g. a counter of host reads).
    """
    if chunk:
        ctx = StepContext(
            backward=accelerator.backward,
            no_sync=lambda: accelerator.no_sync(model),
            sync=True,
            may_backward=lambda t: True,
        )
        return grad_cache_step(model, features, lambda emb: loss_from(*emb), ctx, chunk)
    embeddings = [model(f) for f in features]
    with around_loss or nullcontext():
        loss = loss_from(*embeddings)
    accelerator.backward(loss)
    return loss
