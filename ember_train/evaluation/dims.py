"""Evaluate at shorter vector lengths: every evaluator again on the first ``d`` coordinates.

A Matryoshka-trained model (``loss.matryoshka_dims``) is meant to be cut to a prefix; so is any
model, with some loss. ``eval.dims: [64, 128]`` runs each evaluator at full length and then at
each listed length, embedding every text once: the full vectors are remembered for the
evaluator's passes and truncated (then re-normalised when the model normalises, as
``SentenceTransformer(..., truncate_dim=d)`` followed by cosine similarity would score them).

Results at a prefix length carry the dataset name with ``@dim<d>`` appended, e.g. ``dev@dim64``,
so metric keys read ``dev@dim64/ndcg@10`` (and ``dev/ndcg@10`` at full length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

from ember_train.evaluation.base import EvalResult, Evaluator, SupportsEncode


def dim_suffix(dim: int) -> str:
    """What a result at prefix length ``dim`` appends to its dataset name."""
    return f"@dim{dim}"


def check_eval_dims(dims: Sequence[int]) -> None:
    """Raise ``ValueError`` unless every length is positive and listed once."""
    if any(d <= 0 for d in dims):
        raise ValueError(f"dims must be positive, got {list(dims)}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"dims must be unique, got {list(dims)}")


class _RememberedEncoder:
    """Embeds each (texts, kind) once; later calls with the same texts get the same tensor."""

    def __init__(self, encoder: SupportsEncode) -> None:
        self.encoder = encoder
        self.normalize = bool(getattr(encoder, "normalize", False))
        self._seen: dict[tuple[str | None, tuple[str, ...]], torch.Tensor] = {}

    def encode(self, texts: Sequence[str], batch_size: int = 32, kind: str | None = None) -> torch.Tensor:
        key = (kind, tuple(texts))
        if key not in self._seen:
            self._seen[key] = torch.as_tensor(
                self.encoder.encode(list(texts), batch_size=batch_size, kind=kind)
            )
        return self._seen[key]


class _Prefix:
    """The first ``dim`` coordinates of an encoder's vectors (re-normalised if it normalises)."""

    def __init__(self, encoder: _RememberedEncoder, dim: int) -> None:
        self.encoder = encoder
        self.dim = dim

    def encode(self, texts: Sequence[str], batch_size: int = 32, kind: str | None = None) -> torch.Tensor:
        full = self.encoder.encode(texts, batch_size=batch_size, kind=kind)
        if self.dim > full.shape[-1]:
            raise ValueError(
                f"eval.dims: {self.dim} is larger than the model's embedding dimension {full.shape[-1]}"
            )
        prefix = full[..., : self.dim]
        return F.normalize(prefix.float(), dim=-1) if self.encoder.normalize else prefix


def evaluate_at_dims(
    evaluators: Sequence[Evaluator], encoder: SupportsEncode, dims: Sequence[int] = ()
) -> list[EvalResult]:
    """Each evaluator at full length, then at each of ``dims`` (dataset ``<name>@dim<d>``), in that order."""
    results = []
    for evaluator in evaluators:
        remembered = _RememberedEncoder(encoder) if dims else encoder
        results.append(evaluator(remembered))
        for dim in dims:
            result = evaluator(_Prefix(remembered, dim))
            results.append(
                replace(
                    result,
                    dataset=result.dataset + dim_suffix(dim),
                    extra={**result.extra, "dim": dim},
                )
            )
    return results
