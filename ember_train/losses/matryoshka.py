"""Matryoshka representation learning (Kusupati et al. 2022, arXiv 2205.13147): a loss on prefixes.

The wrapped loss is applied to the first ``d`` coordinates of every embedding for each ``d`` in
``dims`` and the results are summed with ``weights``, so that the vector cut to any of those
lengths (and re-normalised, as cosine similarity and InfoNCE do) is itself a good embedding.
Any loss over embedding batches works unchanged: it receives truncated tensors and does its own
normalisation, so "truncate, then L2-normalise" holds for InfoNCE and the cosine pair losses alike.
The gradient cache and cross-device gathering need nothing special: they call the wrapped loss
on full embeddings, and each prefix's loss gathers its own slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def check_matryoshka_dims(dims: Sequence[int], weights: Sequence[float] | None) -> None:
    """Raise ``ValueError`` unless ``dims`` are positive, unique and descending and ``weights`` match them."""
    if weights is not None and not dims:
        raise ValueError("matryoshka_weights needs matryoshka_dims")
    if not dims:
        return
    if any(d <= 0 for d in dims):
        raise ValueError(f"matryoshka_dims must be positive, got {list(dims)}")
    if any(a <= b for a, b in zip(dims, dims[1:], strict=False)):
        raise ValueError(
            f"matryoshka_dims must be unique and descending (e.g. [384, 256, 128, 64]), got {list(dims)}"
        )
    if weights is not None:
        if len(weights) != len(dims):
            raise ValueError(
                f"matryoshka_weights has {len(weights)} values for {len(dims)} matryoshka_dims {list(dims)}"
            )
        if any(w <= 0 for w in weights):
            raise ValueError(f"matryoshka_weights must be > 0, got {list(weights)}")


def check_dims_fit(dims: Sequence[int], model_dim: int, key: str) -> None:
    """Raise ``ValueError`` naming ``key`` when a prefix is longer than the model's vectors."""
    too_long = [d for d in dims if d > model_dim]
    if too_long:
        raise ValueError(
            f"{key}: {', '.join(map(str, too_long))} is larger than the model's embedding dimension {model_dim}"
        )


class MatryoshkaLoss(nn.Module):
    """``Σ_k weights[k] · loss(x_1[..., :dims[k]], x_2[..., :dims[k]], ...)``.

    Positional arguments are embeddings (``[..., D]`` tensors, or ``None``) and are truncated;
    keyword arguments (a pair loss's ``target``) are passed through unchanged.

    Args:
        loss: any embedding-level loss (:class:`~ember_train.losses.infonce.InfoNCELoss`,
            :class:`~ember_train.losses.cosine.CosineMSELoss`, ...).
        dims: prefix lengths, unique and descending; include the model's full dimension to
            train the full vector too.
        weights: one per dimension; default all 1.
    """

    def __init__(self, loss: nn.Module, dims: Sequence[int], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not dims:
            raise ValueError("MatryoshkaLoss needs at least one dimension")
        check_matryoshka_dims(dims, weights)
        self.loss = loss
        self.dims = list(dims)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.dims)

    def forward(self, *embeddings: torch.Tensor | None, **kwargs: object) -> torch.Tensor:
        total: torch.Tensor | None = None
        for dim, weight in zip(self.dims, self.weights, strict=True):
            prefixes = [None if e is None else e[..., :dim] for e in embeddings]
            term = weight * self.loss(*prefixes, **kwargs)
            total = term if total is None else total + term
        assert total is not None
        return total


def with_matryoshka(loss: nn.Module, dims: Sequence[int], weights: Sequence[float] | None) -> nn.Module:
    """``loss`` on prefixes when the config lists Matryoshka dimensions, else ``loss`` itself."""
    return MatryoshkaLoss(loss, dims, weights) if dims else loss
